/**
 * Full-boot cases: a stock Debian kernel reaches our initramfs /init, reports what it
 * sees, and powers off. Run natively where KVM can run stock kernels, else inside
 * the nested runner (tests/nested/). Each case returns nothing or throws with the
 * console tail.
 */

import { bootTest, GUEST_CMDLINE, waitForConsole } from "../../mod.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";

/** One boot case. */
export interface BootCase {
  /** Test name. */
  name: string;
  /** Runs the case against the built guest. */
  run(guest: GuestAssets): Promise<void>;
}

const CASE_TIMEOUT_MS = 240_000;

function assert(cond: unknown, msg: string, tail: string): asserts cond {
  if (!cond) throw new Error(`${msg}\n--- console tail ---\n${tail}`);
}

function kernelBoot(line: "6.1" | "6.12", cpus: number): BootCase {
  return {
    name: `Debian ${line} cloud kernel boots to /init with ${cpus} vCPU${cpus > 1 ? "s" : ""} and powers off`,
    run: async (g) => {
      const k = g.kernels[line];
      await bootTest({
        kernel: k.vmlinux,
        initrd: k.initramfs,
        cpus,
        memoryMiB: 256,
        cmdline: GUEST_CMDLINE.replace("tsvmm.shell=1", "tsvmm.checks=cpus"),
      }, async (vm) => {
        const m = await waitForConsole(vm, /TSVMM-INIT-MARKER kernel=(\S+) cpus=(\d+)/, CASE_TIMEOUT_MS);
        assert(m[1] === k.release, `guest runs ${m[1]}, expected ${k.release}`, vm.consoleTail());
        assert(Number(m[2]) === cpus, `guest sees ${m[2]} CPUs, expected ${cpus}`, vm.consoleTail());
        const c = await waitForConsole(vm, /TSVMM-CHECK cpus online=(\S+) count=(\d+)/, 60_000);
        assert(
          Number(c[2]) === cpus,
          `guest has ${c[2]} CPUs online (${c[1]}), expected ${cpus}`,
          vm.consoleTail(),
        );
        const exit = await vm.wait();
        assert(
          exit.code === 0 && exit.reason === "poweroff",
          `VM ended with ${exit.message}`,
          vm.consoleTail(),
        );
      }, CASE_TIMEOUT_MS);
    },
  };
}

/** Every full-boot case, in the order they run. */
export const BOOT_CASES: BootCase[] = [
  kernelBoot("6.1", 1),
  kernelBoot("6.1", 2),
  kernelBoot("6.12", 1),
  kernelBoot("6.12", 2),
];
