/**
 * Devices on the PCI bus from a script: a scratch disk over modern virtio-PCI, a second one
 * over the legacy interface, virtio-rng over virtio-MMIO, all in one VM; the guest lists
 * its PCI functions and drivers, then powers off. Run: deno run -A examples/pci_devices.ts
 */

import { bootTest, buildGuest, GUEST_CMDLINE, waitForConsole } from "../mod.ts";

const guest = await buildGuest();
const disk = await Deno.makeTempFile({ suffix: ".img" });
const old = await Deno.makeTempFile({ suffix: ".img" });
await Deno.truncate(disk, 16 << 20);
await Deno.truncate(old, 16 << 20);
try {
  await bootTest(
    {
      kernel: guest.kernels["6.1"].vmlinux,
      initrd: guest.initramfs,
      cmdline: GUEST_CMDLINE,
      disks: [{ path: disk, transport: "pci" }, { path: old, transport: "pci-legacy" }],
      rng: { transport: "mmio" },
    },
    async (vm) => {
      await waitForConsole(vm, /busybox shell/, 120_000);
      const from = vm.consoleText.length;
      vm.send(
        "for d in /sys/bus/pci/devices/*; do echo $(basename $d) $(cat $d/vendor):$(cat $d/device) " +
          "rev=$(cat $d/revision) driver=$(basename $(readlink $d/driver) 2>/dev/null); done; echo LIST''ED\n",
      );
      await waitForConsole(vm, /LISTED\r?\n/, 30_000, from);
      console.log(vm.consoleText.slice(from).split("\n").filter((l) => /^0000:/.test(l)).join("\n"));
      vm.send("poweroff -f\n");
      console.log(await vm.wait());
    },
  );
} finally {
  await Deno.remove(disk);
  await Deno.remove(old);
}
