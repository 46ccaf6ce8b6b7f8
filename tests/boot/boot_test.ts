/**
 * Full boots of stock Debian kernels to our initramfs /init, with 1 and 2 vCPUs.
 * Natively where this host's KVM runs stock kernels; otherwise inside the nested
 * runner (an L1 VM under QEMU TCG with an emulated SVM CPU and the real kvm_amd),
 * together with the tiny-guest cases when this host has no /dev/kvm it can open, so
 * one L1 boot serves both.
 */

import { BOOT_CASES } from "./cases.ts";
import { TINY_CASES } from "../vmm/tiny_guest_cases.ts";
import {
  hostKvmRunsStockKernels,
  hostKvmUsable,
  type L1Run,
  nestedUnavailable,
  runNested,
  shareOut,
} from "../nested/runner.ts";
import { buildGuest } from "../../vmm/guest/build.ts";

const native = hostKvmRunsStockKernels();

/** Why an L1's cases left without a result are run again in a fresh L1 (undefined: they are not). */
function whyRedo(run: L1Run, timeoutMs: number): string | undefined {
  return run.frozen
    ? "an L1 froze"
    : run.abandoned !== undefined
    ? `an L1 was given up: ${run.abandoned}`
    : run.timedOut
    ? `an L1 did not finish within ${timeoutMs / 60_000} minutes`
    : !run.completed
    ? "an L1 ended before its program finished (L1's kernel panicked or QEMU exited)"
    : undefined;
}

/** How an L1 ended: its kernel's first failure report, if it made one, then its console's last lines. */
function l1Failure(run: L1Run): string {
  return (run.l1Oops ? `${run.l1Oops}\n[...]\n` : "") + run.tail.slice(-1200);
}

/**
 * How many L1s run the cases side by side (TSVMM_L1_SHARDS, 1-4, default 2). One L1 keeps about
 * one of this machine kind's two cores busy (its L2 guest has one vCPU, and the cases run one
 * at a time inside it), so two halve the wall time of the boot cases where the second core is
 * free, as it is while this test runs (the test files run one after the other). Each L1 is a
 * QEMU with 3 GiB of RAM.
 */
function l1Count(): number {
  const n = Number(Deno.env.get("TSVMM_L1_SHARDS") ?? "2");
  return Number.isInteger(n) && n >= 1 && n <= 4 ? n : 2;
}

const escape = (n: string) => n.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/**
 * Runs the cases named in one L1, and the ones left without a result (an L1 frozen, given
 * up, out of time or ended early) again in a fresh L1, at most twice: QEMU's emulated SVM
 * sometimes freezes L1 itself, panics L1's kernel, or leaves an L2 vCPU that ignores its stop
 * (README, Known problems). Two more, not one: on one machine two L1s in a row panicked in
 * their own kernel.
 */
async function runShard(names: string[], tiny: boolean, echo: boolean, shard: number): Promise<L1Run> {
  const SILENCE_MS = 3 * 60_000;
  const L1_TIMEOUT_MS = 35 * 60_000;
  const only = (ns: string[]) => `^(${ns.map(escape).join("|")})$`;
  const run = await runNested({
    timeoutMs: L1_TIMEOUT_MS,
    silenceMs: SILENCE_MS,
    tiny,
    filter: only(names),
    echo,
  });
  const done = new Set(run.results.map((r) => r.name));
  let last = run;
  for (let attempt = 2; attempt <= 3; attempt++) {
    const redo = whyRedo(last, L1_TIMEOUT_MS);
    if (!redo) break;
    const left = names.filter((n) => !done.has(n));
    if (!left.length) break;
    console.warn(
      `shard ${shard}: ${redo}, after ${done.size} result(s); ${left.length} case(s) run again in L1 #${attempt}`,
    );
    const again = await runNested({
      timeoutMs: L1_TIMEOUT_MS,
      silenceMs: SILENCE_MS,
      tiny,
      filter: only(left),
      echo,
    });
    for (const r of again.results) {
      if (done.has(r.name)) continue;
      done.add(r.name);
      run.results.push({
        ...r,
        retriedAfter: r.retriedAfter ?? `${redo}:\n${l1Failure(last)}`,
      });
    }
    run.l1NetDevices ??= again.l1NetDevices;
    run.tail += `\n--- L1 #${attempt} ---\n${again.tail}`;
    last = again;
  }
  return run;
}

const tinyInL1 = !hostKvmUsable();

Deno.test({
  name: native
    ? "full boot (native KVM)"
    : `KVM tests in the nested runner's L1: ${tinyInL1 ? "tiny guests and " : ""}full boots`,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    if (native) {
      const guest = await buildGuest({ quiet: true });
      for (const c of BOOT_CASES) await t.step(c.name, () => c.run(guest));
      return;
    }
    const why = nestedUnavailable();
    if (why) throw new Error(`the nested runner cannot run: ${why}`);
    const echo = Deno.env.get("TSVMM_ECHO_L1") === "1";
    const all = [...(tinyInL1 ? TINY_CASES : []), ...BOOT_CASES];
    // Built (or found in the cache) once here: the L1s' runners would otherwise both build an
    // empty cache at once, into the same temporary directories.
    await buildGuest({ quiet: true });
    const shards = shareOut(all, l1Count()).filter((names) => names.length > 0);
    const runs = await Promise.all(shards.map((names, i) => runShard(names, tinyInL1, echo, i + 1)));
    const run: L1Run = {
      ...runs[0],
      results: runs.flatMap((r) => r.results),
      l1NetDevices: runs.find((r) => r.l1NetDevices !== undefined)?.l1NetDevices,
      completed: runs.every((r) => r.completed),
      ms: Math.max(...runs.map((r) => r.ms)),
      tail: runs.map((r, i) => (runs.length > 1 ? `=== shard ${i + 1} ===\n` : "") + r.tail).join("\n"),
    };
    // Where the suite's time goes: each case's time in L1 (boot included), slowest first.
    const times = [...run.results].sort((a, b) => b.ms - a.ms).map((r) =>
      `${(r.ms / 1000).toFixed(1).padStart(6)} s  ${r.name}${r.retriedAfter ? " (retried)" : ""}`
    );
    console.log(
      `L1 case times (${runs.length} L1s side by side; their first runs took ${
        runs.map((r) => (r.ms / 1000).toFixed(0)).join(" and ")
      } s):\n${times.join("\n")}`,
    );
    await t.step("L1 has no network device (QEMU started with -nic none)", () => {
      if (run.l1NetDevices === undefined) {
        throw new Error(
          `L1 did not report its PCI network controllers\n--- L1 console tail ---\n${run.tail}`,
        );
      }
      if (run.l1NetDevices !== 0) throw new Error(`L1 has ${run.l1NetDevices} PCI network controller(s)`);
    });
    const names = [
      ...(tinyInL1 ? TINY_CASES.map((c) => `${c.name} (in L1)`) : []),
      ...BOOT_CASES.map((c) => c.name),
    ];
    for (const name of names) {
      const r = run.results.find((x) => x.name === name.replace(/ \(in L1\)$/, ""));
      await t.step(name, () => {
        if (!r) {
          throw new Error(
            `no result from L1 (L1 ${run.completed ? "finished" : "did not finish"} after ${run.ms} ms)\n` +
              `--- L1 console tail ---\n${run.tail}`,
          );
        }
        if (!r.ok) throw new Error(r.error);
        if (r.retriedAfter) {
          console.warn(
            `RETRIED: "${name}" passed on its second attempt; the first failed with:\n${r.retriedAfter}`,
          );
        }
      });
    }
  },
});
