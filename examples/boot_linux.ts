/**
 * Boots the default guest (Debian 6.1 cloud kernel + our initramfs) with 2 vCPUs,
 * waits for its /init marker, asks for the CPU check, and waits for the power-off.
 * Run: deno run -A examples/boot_linux.ts
 */

import { bootTest, buildGuest, GUEST_CMDLINE, waitForConsole } from "../mod.ts";

const guest = await buildGuest();
const k = guest.kernels["6.1"];
await bootTest({
  kernel: k.vmlinux,
  initrd: k.initramfs,
  cpus: 2,
  cmdline: GUEST_CMDLINE.replace("tsvmm.shell=1", "tsvmm.checks=cpus"),
}, async (vm) => {
  const m = await waitForConsole(vm, /TSVMM-INIT-MARKER kernel=(\S+) cpus=(\d+)/, 120_000);
  console.log(`guest /init reached: kernel ${m[1]}, ${m[2]} CPUs`);
  console.log((await waitForConsole(vm, /TSVMM-CHECK cpus .*/, 30_000))[0]);
  console.log(await vm.wait());
});
