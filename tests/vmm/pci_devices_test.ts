/**
 * The VM's PCI bus as the VMM wires it (vmm/pci_devices.ts), with the KVM calls it makes
 * recorded: BARs decode on the MMIO bus where the guest puts them, doorbell ioeventfds
 * follow, decoding off or an unusable address takes the device off the bus, and MSI-X
 * vectors become routes in one table that keeps the irqchip's pins.
 */

import assert from "node:assert/strict";
import { Bus } from "../../vmm/bus.ts";
import { EventLoop } from "../../vmm/event_loop.ts";
import { GsiRouting } from "../../vmm/irq_routing.ts";
import { PciDevices, type PciVm } from "../../vmm/pci_devices.ts";
import type { GsiRoute } from "../../vmm/vm.ts";
import { VirtioRng } from "../../devices/virtio/rng.ts";
import { GuestRam } from "../harness/virtio_driver.ts";
import { MODERN_BAR } from "../../transports/pci.ts";
import { ECAM_START } from "../../vmm/arch/x86_64/layout.ts";
import { sharedAccess, SharedRegisters } from "../../vmm/shared_regs.ts";
import { LEGACY_REG } from "../../transports/pci_legacy.ts";

class RecordingVm implements PciVm {
  ioeventfds = new Map<number, number>(); // addr -> fd
  irqfds = new Map<number, number>(); // fd -> gsi
  routes: GsiRoute[] = [];
  irqfd(fd: number, gsi: number): void {
    this.irqfds.set(fd, gsi);
  }
  irqfdDeassign(fd: number): void {
    assert.ok(this.irqfds.delete(fd), "deassigned an irqfd that was not assigned");
  }
  ioeventfd(fd: number, addr: number, _len: number, opts: { deassign?: boolean } = {}): void {
    if (opts.deassign) assert.ok(this.ioeventfds.delete(addr), `no ioeventfd at 0x${addr.toString(16)}`);
    else {
      assert.ok(!this.ioeventfds.has(addr), "two ioeventfds at one address");
      this.ioeventfds.set(addr, fd);
    }
  }
  setGsiRouting(routes: readonly GsiRoute[]): void {
    this.routes = [...routes];
  }
}

function setup() {
  const vm = new RecordingVm();
  const pio = new Bus("pio"), mmio = new Bus("mmio");
  const loop = new EventLoop();
  const ram = new GuestRam(1 << 20);
  const pci = new PciDevices(vm, pio, mmio, ram.mem, loop, new GsiRouting(vm), [2 ** 33, 2 ** 34]);
  const a = pci.add(new VirtioRng({ fill: (b) => b.fill(1) }), "pci");
  const b = pci.add(new VirtioRng({ fill: (b) => b.fill(2) }), "pci");
  const numQueues = (base: number) => {
    const d = new Uint8Array(2);
    mmio.read(base + MODERN_BAR.common + 0x12, d);
    return d[0] | (d[1] << 8);
  };
  const ecam = (slot: number, off: number, v: number, size = 4) => {
    const d = new Uint8Array(size);
    for (let i = 0; i < size; i++) d[i] = (v >>> (8 * i)) & 0xff;
    mmio.write(ECAM_START + (slot << 15) + off, d);
  };
  return { vm, mmio, pci, a, b, numQueues, ecam, loop };
}

Deno.test("pci devices: a BAR moved by the guest moves the device and its doorbells", async () => {
  const { vm, a, b, numQueues, ecam, loop, pci } = setup();
  const base = a.transport.config.bar(0)!.address;
  assert.equal(base, 0xc000_0000, "the VMM's assignment, in the 32-bit window");
  assert.equal(numQueues(base), 1, "the common config answers at the BAR");
  assert.ok(vm.ioeventfds.has(base + MODERN_BAR.notify), "doorbell ioeventfd at the BAR");
  const to = 0xc010_0000;
  ecam(a.slot, 0x10, to);
  assert.equal(numQueues(to), 1, "answers at the new address");
  assert.equal(numQueues(base), 0xffff, "and no longer at the old one");
  assert.ok(vm.ioeventfds.has(to + MODERN_BAR.notify) && !vm.ioeventfds.has(base + MODERN_BAR.notify));
  // Decoding off: gone; on again: back.
  ecam(a.slot, 0x04, 0x4, 2);
  assert.equal(numQueues(to), 0xffff);
  assert.equal(vm.ioeventfds.has(to + MODERN_BAR.notify), false);
  ecam(a.slot, 0x04, 0x6, 2);
  assert.equal(numQueues(to), 1);
  // Onto ECAM (outside the windows): refused, ECAM still works.
  ecam(a.slot, 0x10, ECAM_START);
  const id = new Uint8Array(2);
  pci.bus.ecam.read(0, id);
  assert.equal(id[0] | (id[1] << 8), 0x8086, "ECAM intact");
  assert.equal(vm.ioeventfds.has(ECAM_START + MODERN_BAR.notify), false);
  // Onto the other device's BAR: refused; the other device keeps answering.
  const other = b.transport.config.bar(0)!.address;
  const otherDoorbell = vm.ioeventfds.get(other + MODERN_BAR.notify);
  ecam(a.slot, 0x10, other);
  assert.equal(numQueues(other), 1);
  assert.equal(
    vm.ioeventfds.get(other + MODERN_BAR.notify),
    otherDoorbell,
    "the other device keeps its doorbell",
  );
  assert.equal(b.transport.core.counters.notifies, 0);
  // Sizing (all ones) while decoding: harmless, and restoring brings it back.
  ecam(a.slot, 0x10, 0xffff_ffff);
  ecam(a.slot, 0x10, base);
  assert.equal(numQueues(base), 1);
  // Into the 64-bit window.
  ecam(a.slot, 0x14, 2);
  assert.equal(numQueues(2 ** 33 + base), 1, "a 64-bit address above RAM");
  await pci.close();
  await loop.stop();
});

Deno.test("pci devices: vCPU threads answer the ISR's read-to-clear wherever the guest puts the BAR", () => {
  const vm = new RecordingVm();
  const pio = new Bus("pio"), mmio = new Bus("mmio");
  const ram = new GuestRam(1 << 20);
  const shared = new SharedRegisters();
  const pci = new PciDevices(
    vm,
    pio,
    mmio,
    ram.mem,
    new EventLoop(),
    new GsiRouting(vm),
    [2 ** 33, 2 ** 34],
    shared,
  );
  const modern = pci.add(new VirtioRng({ fill: (b) => b.fill(1) }), "pci");
  const legacy = pci.add(new VirtioRng({ fill: (b) => b.fill(2) }), "pci-legacy");
  const w = new Int32Array(shared.buffer);
  const d = new Uint8Array(8);
  const vcpuRead = (addr: number, port: boolean) =>
    sharedAccess(w, addr, false, 1, d, port) ? d[0] : undefined;
  const setIsr = (p: typeof modern, v: number) =>
    Atomics.store(p.transport.core.isr.array, p.transport.core.isr.index, v);
  const mbase = modern.transport.config.bar(0)!.address;
  const lbase = legacy.transport.config.bar(0)!.address;
  setIsr(modern, 1);
  setIsr(legacy, 3);
  assert.equal(vcpuRead(mbase + MODERN_BAR.isr, false), 1, "modern: the memory BAR's ISR");
  assert.equal(modern.transport.core.interruptStatus, 0, "read-to-clear, as the register file's read");
  assert.equal(vcpuRead(lbase + LEGACY_REG.isr, true), 3, "legacy: the I/O BAR's ISR");
  assert.equal(legacy.transport.core.interruptStatus, 0);
  assert.equal(vcpuRead(mbase + MODERN_BAR.isr + 1, false), undefined, "other registers go to the device");
  // The guest moves the modern BAR, then turns the legacy function's I/O decoding off.
  const ecam = (slot: number, off: number, v: number, size = 4) => {
    const b = new Uint8Array(size);
    for (let i = 0; i < size; i++) b[i] = (v >>> (8 * i)) & 0xff;
    mmio.write(ECAM_START + (slot << 15) + off, b);
  };
  ecam(modern.slot, 0x10, 0xc010_0000);
  setIsr(modern, 1);
  assert.equal(vcpuRead(mbase + MODERN_BAR.isr, false), undefined, "not at the old address");
  assert.equal(modern.transport.core.interruptStatus, 1);
  assert.equal(vcpuRead(0xc010_0000 + MODERN_BAR.isr, false), 1, "at the new one");
  ecam(legacy.slot, 0x04, 0x2, 2); // memory only, no I/O
  setIsr(legacy, 1);
  assert.equal(vcpuRead(lbase + LEGACY_REG.isr, true), undefined, "I/O decoding off: nowhere");
  assert.equal(legacy.transport.core.interruptStatus, 1);
  ecam(legacy.slot, 0x04, 0x3, 2);
  assert.equal(vcpuRead(lbase + LEGACY_REG.isr, true), 1, "decoding on again: back");
});

Deno.test("pci devices: MSI-X vectors become routes beside the irqchip's pins; masking deassigns first", async () => {
  const { vm, a, ecam, mmio, loop, pci } = setup();
  const base = a.transport.config.bar(0)!.address;
  const entry = (i: number, addr: number, masked: boolean) => {
    const d = new Uint8Array(16);
    const dv = new DataView(d.buffer);
    dv.setUint32(0, addr, true);
    dv.setUint32(8, 0x40 + i, true);
    dv.setUint32(12, masked ? 1 : 0, true);
    mmio.write(base + MODERN_BAR.msixTable + 16 * i, d);
  };
  const cap = a.transport.config.bytes[0x34]; // MSI-X is the first capability
  ecam(a.slot, cap + 2, 0x8000, 2);
  entry(0, 0xfee0_0000, false);
  entry(1, 0xfed0_0000, false); // not an interrupt address: no route
  const msi = vm.routes.filter((r) => r.kind === "msi");
  assert.equal(msi.length, 1);
  assert.equal(vm.routes.filter((r) => r.kind === "irqchip" && r.chip === 2).length, 24, "IOAPIC pins kept");
  assert.equal(vm.routes.filter((r) => r.kind === "irqchip" && r.chip !== 2).length, 16, "PIC pins kept");
  const gsi = msi[0].gsi;
  assert.ok(gsi >= 24);
  assert.ok([...vm.irqfds.values()].includes(gsi), "irqfd on the vector's GSI");
  entry(0, 0xfee0_0000, true);
  assert.equal([...vm.irqfds.values()].includes(gsi), false, "masked: irqfd deassigned");
  assert.equal(vm.routes.filter((r) => r.kind === "msi").length, 0);
  await pci.close();
  await loop.stop();
});
