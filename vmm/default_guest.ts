/** The project's default guest: the Debian 6.1 cloud kernel and our initramfs, built on first use. */

import type { VmConfig } from "./config.ts";
import { buildGuest, GUEST_CMDLINE } from "./guest/build.ts";

/** Kernel, initrd and command line of the default guest, building it if needed. */
export async function defaultGuest(config: VmConfig): Promise<Partial<VmConfig>> {
  const g = await buildGuest({ quiet: false });
  return {
    kernel: g.kernels["6.1"].vmlinux,
    initrd: g.initramfs,
    cmdline: config.cmdline ?? GUEST_CMDLINE,
  };
}
