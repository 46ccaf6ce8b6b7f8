/**
 * Stock-kernel early boot on a PVM /dev/kvm (docs/DESIGN.md, "KVM on our machines"): the
 * Debian 6.1 cloud kernel, uncompressed, CX16 masked, `noxsave earlyprintk=serial`,
 * prints the e820 map we built, finds our ACPI tables, the IOAPIC and 2 CPUs from the
 * MADT, and the run ends with our clean emulation-failure report. It is the one test of a
 * stock kernel on PVM, where the full boots cannot run. Elsewhere it is skipped, loudly:
 * where KVM runs stock kernels (natively or in the nested runner's L1) the full-boot cases
 * boot the same kernels to /init.
 */

import assert from "node:assert/strict";
import { createVm, waitForConsole } from "../../mod.ts";
import { buildGuest } from "../../vmm/guest/build.ts";

const pvm = (() => {
  try {
    Deno.statSync("/sys/module/kvm_pvm");
    Deno.openSync("/dev/kvm", { read: true, write: true }).close();
    return true;
  } catch {
    return false;
  }
})();
if (!pvm) {
  console.error(
    "SKIPPED early boot on PVM: this host has no PVM /dev/kvm it can open. The test checks how far a " +
      "stock kernel gets on PVM; without PVM the full-boot cases boot stock kernels to /init instead " +
      "(natively or in the nested runner's L1)",
  );
}

Deno.test({
  name: "early boot on PVM: e820, ACPI tables, IOAPIC and 2 CPUs; clean end report",
  ignore: !pvm,
  fn: async () => {
    const guest = await buildGuest({ quiet: true });
    const vm = await createVm({
      kernel: guest.kernels["6.1"].vmlinux,
      cpus: 2,
      memoryMiB: 512,
      cpuidMask: "-cx16",
      bootProtocol: "linux64",
      cmdline: "console=ttyS0 noxsave earlyprintk=serial,ttyS0,115200 reboot=k panic=-1",
    });
    await vm.start();
    try {
      await waitForConsole(vm, /smpboot: Allowing 2 CPUs/, 180_000);
      const text = vm.consoleText;
      for (
        const line of [
          "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
          "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
          "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
          "BIOS-e820: [mem 0x00000000e0000000-0x00000000e00fffff] reserved",
        ]
      ) assert.ok(text.includes(line), `missing "${line}"`);
      assert.match(text, /ACPI: RSDP 0x00000000000E0000 000024 \(v02 TSVMM \)/);
      for (const t of ["XSDT", "FACP", "DSDT", "APIC", "MCFG"]) {
        assert.match(text, new RegExp(`ACPI: ${t} 0x`));
      }
      assert.match(text, /IOAPIC\[0\]: apic_id 0, version \d+, address 0xfec00000, GSI 0-23/);
      assert.match(text, /ACPI: INT_SRC_OVR \(bus 0 bus_irq 0 global_irq 2 dfl dfl\)/);
      const exit = await vm.wait();
      assert.equal(exit.code, 1);
      assert.equal(exit.reason, "internal-error", exit.message);
      assert.match(
        exit.message,
        /^vCPU 0: KVM internal error: emulation failure at RIP 0xffffffff[0-9a-f]+, instruction bytes: ([0-9a-f]{2} ?)+$/,
      );
    } finally {
      await vm.stop();
    }
  },
});
