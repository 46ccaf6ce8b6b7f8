/**
 * A guest on the network: the host side of a TAP gets 169.254.20.1/24, the guest's eth0
 * 169.254.20.2/24 over virtio-net (modern virtio-PCI); each pings the other, then the guest
 * powers off. Needs root (it creates the TAP). It runs itself inside a network namespace of
 * its own (`unshare -n`), so nothing it sends can leave this machine.
 * Run: deno run -A examples/net_tap.ts
 */

import {
  bootTest,
  buildGuest,
  createPersistentTap,
  GUEST_CMDLINE,
  removePersistentTap,
  waitForConsole,
} from "../mod.ts";

const TAP = "tsvmm-ex0";

async function sh(cmd: string): Promise<string> {
  const out = await new Deno.Command("sh", { args: ["-c", cmd], stdout: "piped", stderr: "piped" }).output();
  return new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
}

const interfaces = Deno.readTextFileSync("/proc/self/net/dev").split("\n").slice(2)
  .map((l) => l.split(":")[0].trim()).filter((n) => n && n !== "lo");
if (interfaces.length > 0) {
  // Not in a namespace of our own yet: run again inside a fresh one.
  const self = new URL(import.meta.url).pathname;
  const r = await new Deno.Command("unshare", { args: ["-n", Deno.execPath(), "run", "-A", self] }).output();
  Deno.exit(r.code);
}

const guest = await buildGuest();
createPersistentTap(TAP);
try {
  await sh(`ip link set lo up; ip addr add 169.254.20.1/24 dev ${TAP}; ip link set ${TAP} up`);
  await bootTest(
    {
      kernel: guest.kernels["6.1"].vmlinux,
      initrd: guest.initramfs,
      cmdline: GUEST_CMDLINE,
      nets: [{ tap: TAP, mac: "52:54:00:20:00:02", transport: "pci" }],
    },
    async (vm) => {
      await waitForConsole(vm, /busybox shell/, 120_000);
      const from = vm.consoleText.length;
      vm.send(
        "ip link set eth0 up; ip addr add 169.254.20.2/24 dev eth0; ping -c 3 169.254.20.1; echo PING''ED\n",
      );
      await waitForConsole(vm, /PINGED\r?\n/, 60_000, from); // (the typed line reads PING''ED)
      console.log(vm.consoleText.slice(from));
      console.log(await sh("ping -c 3 169.254.20.2 2>&1 || busybox ping -c 3 169.254.20.2"));
      vm.send("poweroff -f\n");
      console.log(await vm.wait());
    },
  );
} finally {
  removePersistentTap(TAP);
}
