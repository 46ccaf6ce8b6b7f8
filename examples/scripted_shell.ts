/**
 * A scripted session on the default guest's shell: type commands, read their output,
 * power off. Run: deno run -A examples/scripted_shell.ts
 */

import { bootTest, buildGuest, GUEST_CMDLINE, waitForConsole } from "../mod.ts";

const guest = await buildGuest();
await bootTest(
  { kernel: guest.kernels["6.1"].vmlinux, initrd: guest.initramfs, cmdline: GUEST_CMDLINE },
  async (vm) => {
    await waitForConsole(vm, /busybox shell/, 120_000);
    const from = vm.consoleText.length;
    vm.send("echo kernel=$(uname -r); cat /proc/cmdline\n");
    console.log((await waitForConsole(vm, /kernel=\d\S*/, 30_000, from))[0]); // not the typed line
    vm.send("poweroff -f\n");
    console.log(await vm.wait());
  },
);
