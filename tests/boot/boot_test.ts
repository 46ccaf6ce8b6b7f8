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
    // QEMU's emulated SVM sometimes freezes L1 itself, panics L1's kernel, or leaves an L2 vCPU
    // that ignores its stop (README, Known problems). A frozen L1 stops its heartbeat; an L1
    // with such a vCPU is given up by its program. Either way, the cases left without a result
    // run again in a fresh L1 (at most two more), as do those of an L1 that ran out of time or
    // ended early.
    const SILENCE_MS = 3 * 60_000;
    const L1_TIMEOUT_MS = 35 * 60_000;
    const run = await runNested({ timeoutMs: L1_TIMEOUT_MS, silenceMs: SILENCE_MS, tiny: tinyInL1, echo });
    // Two more, not one: on one machine two L1s in a row panicked in their own kernel.
    const done = new Set(run.results.map((r) => r.name));
    let last = run;
    for (let attempt = 2; attempt <= 3; attempt++) {
      const redo = whyRedo(last, L1_TIMEOUT_MS);
      if (!redo) break;
      const left = [...(tinyInL1 ? TINY_CASES : []), ...BOOT_CASES].map((c) => c.name).filter((n) =>
        !done.has(n)
      );
      if (!left.length) break;
      const escape = (n: string) => n.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
      console.warn(
        `${redo}, after ${done.size} result(s); ${left.length} case(s) run again in L1 #${attempt}`,
      );
      const again = await runNested({
        timeoutMs: L1_TIMEOUT_MS,
        silenceMs: SILENCE_MS,
        tiny: tinyInL1,
        filter: `^(${left.map(escape).join("|")})$`,
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
    // Where the suite's time goes: each case's time in L1 (boot included), slowest first.
    const times = [...run.results].sort((a, b) => b.ms - a.ms).map((r) =>
      `${(r.ms / 1000).toFixed(1).padStart(6)} s  ${r.name}${r.retriedAfter ? " (retried)" : ""}`
    );
    console.log(`L1 case times (the first L1 ran ${(run.ms / 1000).toFixed(0)} s):\n${times.join("\n")}`);
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
