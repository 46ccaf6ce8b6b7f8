/**
 * The nested runner itself: L1 starts with no network device, a hung L1 is killed at its
 * timeout and leaves no QEMU behind, an L1 whose program went quiet is killed as frozen even
 * while its kernel goes on printing, and an L1 its program gave up is reported so.
 */

import assert from "node:assert/strict";
import { l1QemuArgs, nestedUnavailable, runNested, shareOut } from "./runner.ts";
import { BOOT_CASES } from "../boot/cases.ts";

/**
 * L1 QEMU processes started by the runner in process `owner`: their parent is the runner's
 * watchdog shell, which names the owner's pid (other checkouts' L1s on the machine do not count).
 */
async function qemuCount(owner: number = Deno.pid): Promise<number> {
  const out = await new Deno.Command("pgrep", {
    args: ["-f", "^qemu-system-x86_64 -nodefaults -no-user-config -nic none -accel tcg"],
    stdout: "piped",
  }).output();
  let n = 0;
  for (const pid of new TextDecoder().decode(out.stdout).split("\n").filter(Boolean)) {
    try {
      const ppid = Deno.readTextFileSync(`/proc/${pid}/stat`).replace(/^.*\) /s, "").split(" ")[1];
      const parent = Deno.readTextFileSync(`/proc/${ppid}/cmdline`).replaceAll("\0", " ");
      if (parent.includes(`kill -0 ${owner} `)) n++;
    } catch { /* it ended meanwhile */ }
  }
  return n;
}

Deno.test("nested runner: L1's QEMU gets no default devices and no network device", () => {
  const args = l1QemuArgs("/k", "/i");
  for (const a of ["-nodefaults", "-no-user-config"]) {
    assert.ok(args.includes(a), `${a} in ${args.join(" ")}`);
  }
  assert.equal(args[args.indexOf("-nic") + 1], "none");
  assert.ok(!args.some((a) => /^-(netdev|net|device|drive|usb)/.test(a)), args.join(" "));
});

Deno.test("nested runner: the boot cases are shared out between L1s in about equal halves, each case once", () => {
  const cost = (names: string[]) =>
    names.reduce((s, n) => s + (BOOT_CASES.find((c) => c.name === n)!.cost ?? 1), 0);
  const [a, b] = shareOut(BOOT_CASES, 2);
  assert.deepEqual([...a, ...b].sort(), BOOT_CASES.map((c) => c.name).sort());
  const total = cost(a) + cost(b);
  assert.ok(Math.abs(cost(a) - cost(b)) <= 6, `shares of ${cost(a)} and ${cost(b)} out of ${total}`);
  // Each share keeps the suite's order, so the boot cases still run first.
  const order = (ns: string[]) => ns.map((n) => BOOT_CASES.findIndex((c) => c.name === n));
  for (const s of [a, b]) assert.deepEqual(order(s), [...order(s)].sort((x, y) => x - y));
  // One L1: everything, in order; more L1s than cases: empty shares, every case still once.
  assert.deepEqual(shareOut(BOOT_CASES, 1), [BOOT_CASES.map((c) => c.name)]);
  const few = shareOut([{ name: "x", cost: 3 }, { name: "y" }], 3);
  assert.deepEqual(few, [["x"], ["y"], []]);
});

Deno.test("nested runner: L1's clock comes from the TSC only when asked", () => {
  const append = (tsc?: boolean) => {
    const args = l1QemuArgs("/k", "/i", tsc);
    return args[args.indexOf("-append") + 1];
  };
  assert.doesNotMatch(append(), /tsc=reliable/);
  assert.match(append(true), /(^| )tsc=reliable( |$)/);
  assert.match(append(true), /console=ttyS0 /);
});

Deno.test("nested runner: a gdb stub on L1's QEMU, local only and with a louder L1 kernel, only when asked", () => {
  const plain = l1QemuArgs("/k", "/i");
  assert.ok(!plain.includes("-gdb"), plain.join(" "));
  assert.doesNotMatch(plain[plain.indexOf("-append") + 1], /loglevel/);
  const args = l1QemuArgs("/k", "/i", false, 1234);
  assert.equal(args[args.indexOf("-gdb") + 1], "tcp:127.0.0.1:1234");
  assert.match(args[args.indexOf("-append") + 1], /(^| )loglevel=5( |$)/);
  for (const bad of [0, 65536, 1.5, NaN]) assert.throws(() => l1QemuArgs("/k", "/i", false, bad), RangeError);
});

Deno.test({
  name: "nested runner: a run past its timeout fails with the console tail and leaves no QEMU process",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const why = nestedUnavailable();
    if (why) throw new Error(`the nested runner cannot run: ${why}`);
    const before = await qemuCount();
    // Watch for L1's QEMU while the run goes on: the run must have started it.
    let most = before;
    let watching = true;
    const watch = (async () => {
      while (watching) {
        most = Math.max(most, await qemuCount());
        await new Promise((r) => setTimeout(r, 250));
      }
    })();
    // 6 s of QEMU is enough to start L1 but not to finish any boot case (building the L1
    // initramfs comes first and is not counted: the timer starts with QEMU).
    const run = await runNested({ timeoutMs: 6_000 });
    watching = false;
    await watch;
    assert.ok(most > before, `L1's QEMU never ran\n${run.tail}`);
    assert.equal(run.completed, false);
    assert.equal(run.timedOut, true);
    assert.equal(run.results.length, 0);
    assert.ok(run.ms < 60_000, `the run ended at its timeout (${run.ms} ms)`);
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(await qemuCount(), before, "no QEMU left behind");
  },
});

Deno.test({
  name: "nested runner: killing the test process outright (SIGKILL) leaves no QEMU process",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const why = nestedUnavailable();
    if (why) throw new Error(`the nested runner cannot run: ${why}`);
    const before = await qemuCount();
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL("./runner.ts", import.meta.url).pathname],
      stdout: "null",
      stderr: "null",
    }).spawn();
    let seen = false;
    for (let i = 0; i < 120 && !seen; i++) {
      await new Promise((r) => setTimeout(r, 250));
      seen = (await qemuCount(child.pid)) > before;
    }
    assert.ok(seen, "QEMU started");
    child.kill("SIGKILL");
    await child.status;
    let left = -1;
    for (let i = 0; i < 40; i++) {
      await new Promise((r) => setTimeout(r, 250));
      left = await qemuCount(child.pid);
      if (left === before) break;
    }
    assert.equal(left, before, "QEMU ended with its parent");
  },
});

/** A test that boots L1 running tests/nested/l1_chatter.ts in `mode` and checks the run. */
function chatterTest(
  name: string,
  mode: string,
  silenceMs: number,
  check: (run: Awaited<ReturnType<typeof runNested>>) => void,
): void {
  Deno.test({
    name,
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      const why = nestedUnavailable();
      if (why) throw new Error(`the nested runner cannot run: ${why}`);
      check(
        await runNested({
          program: { script: "tests/nested/l1_chatter.ts", args: mode },
          silenceMs,
          timeoutMs: 240_000,
        }),
      );
    },
  });
}

chatterTest(
  "nested runner: an L1 whose program went quiet is frozen, though its kernel still prints",
  "chatter",
  10_000,
  (run) => {
    assert.ok(run.tail.includes("soft lockup"), `L1 printed its chatter\n${run.tail}`);
    // What a RETRIED report shows (the tail's last lines) is L1's own console, not QEMU's
    // warnings about CPU features TCG lacks.
    assert.ok(!run.tail.includes("TCG doesn't support"), `QEMU's feature warnings in the tail\n${run.tail}`);
    assert.ok(
      run.tail.slice(-1200).includes("soft lockup"),
      `L1's last lines in the tail's end\n${run.tail}`,
    );
    assert.equal(run.frozen, true, `killed as frozen, not at the timeout (${run.ms} ms)\n${run.tail}`);
    assert.equal(run.timedOut, false);
    assert.equal(run.completed, false);
    assert.ok(run.ms < 200_000, `killed well before the timeout (${run.ms} ms)`);
  },
);

chatterTest(
  "nested runner: an L1 its program gives up is reported with the reason",
  "abandon",
  60_000,
  (run) => {
    assert.equal(run.abandoned, "a vCPU thread did not stop", run.tail);
    assert.equal(run.frozen, false);
  },
);
