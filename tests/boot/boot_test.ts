/**
 * Full boots of stock Debian kernels to our initramfs /init, with 1 and 2 vCPUs.
 * Natively where this host's KVM runs stock kernels; otherwise inside the nested
 * runner (an L1 VM under QEMU TCG with an emulated SVM CPU and the real kvm_amd).
 */

import { BOOT_CASES } from "./cases.ts";
import { hostKvmRunsStockKernels, nestedUnavailable, runNested } from "../nested/runner.ts";
import { buildGuest } from "../../vmm/guest/build.ts";

const native = hostKvmRunsStockKernels();

Deno.test({
  name: native ? "full boot (native KVM)" : "full boot (nested KVM runner)",
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
    const run = await runNested({ timeoutMs: 45 * 60_000, echo: Deno.env.get("TSVMM_ECHO_L1") === "1" });
    for (const c of BOOT_CASES) {
      const r = run.results.find((x) => x.name === c.name);
      await t.step(c.name, () => {
        if (!r) {
          throw new Error(
            `no result from L1 (L1 ${run.completed ? "finished" : "did not finish"} after ${run.ms} ms)\n` +
              `--- L1 console tail ---\n${run.tail}`,
          );
        }
        if (!r.ok) throw new Error(r.error);
        if (r.retriedAfter) {
          console.warn(
            `RETRIED: "${c.name}" passed on its second attempt; the first failed with:\n${r.retriedAfter}`,
          );
        }
      });
    }
  },
});
