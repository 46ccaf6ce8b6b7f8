/**
 * The VM's PCI bus: the host bridge and config access (ports 0xCF8-0xCFF and ECAM), and
 * virtio devices on it. The VMM assigns each BAR inside the host bridge's windows (there
 * is no firmware) and enables decoding; a guest that moves a BAR or turns decoding off
 * moves the device with it: its MMIO range and doorbell ioeventfds are re-registered at
 * the new address, or dropped while decoding is off or the address is unusable (outside
 * the window or over another range), never a crash. INTx is a level-triggered IOAPIC pin
 * shared by every fourth device (irqfd with resample, re-raised while the ISR is set); the
 * ISR's read-to-clear is answered by the vCPU threads (shared registers, moved with the BAR);
 * MSI-X vectors are KVM MSI routes with irqfds (irq_routing.ts).
 */

import type { VmFd } from "./vm.ts";
import type { Bus } from "./bus.ts";
import type { GuestMemory } from "./memory.ts";
import type { EventLoop } from "./event_loop.ts";
import { RemoteDevice } from "./device_thread.ts";
import { drainEventfd, signalEventfd } from "./event_loop.ts";
import { sysClose, sysEventfd } from "./sys/libc.ts";
import type { GsiRouting, VectorRouter } from "./irq_routing.ts";
import {
  ECAM_SIZE,
  ECAM_START,
  PCI_INTX_GSIS,
  PCI_IO_END,
  PCI_IO_START,
  PCI_MMIO_SIZE,
  PCI_MMIO_START,
} from "./arch/x86_64/layout.ts";
import type { PciHostInfo } from "./arch/x86_64/acpi.ts";
import type { VirtioDevice } from "../devices/virtio/device.ts";
import { type Bar, CMD } from "../devices/pci/config_space.ts";
import { PciBus } from "../devices/pci/bus.ts";
import { type PciBarHandler, type PciFlavor, VirtioPci } from "../transports/pci.ts";
import { SHARED_READ_CLEAR, type SharedRegisters } from "./shared_regs.ts";

/** The VM operations the PCI bus uses (a VmFd; tests record them). */
export type PciVm = Pick<VmFd, "irqfd" | "irqfdDeassign" | "ioeventfd" | "setGsiRouting">;

/** The virtio-PCI transports: modern, legacy (0.9.5) and transitional (both). */
export type PciTransportKind = "pci" | "pci-legacy" | "pci-transitional";

/** The flavour of each transport kind. */
export const PCI_FLAVOR: Readonly<Record<PciTransportKind, PciFlavor>> = {
  "pci": "modern",
  "pci-legacy": "legacy",
  "pci-transitional": "transitional",
};

/** One virtio device on the bus. */
export interface PlacedPciDevice {
  /** The device. */
  device: VirtioDevice;
  /** Its transport. */
  transport: VirtioPci;
  /** Device number on bus 0. */
  slot: number;
  /** INTx GSI. */
  gsi: number;
}

interface Mapping {
  base: number;
  doorbells: Array<{ fd: number; addr: number; len: number; datamatch?: number; pio: boolean; ok: boolean }>;
}

/** The PCI bus of one VM and the virtio devices on it. */
export class PciDevices {
  /** Bus 0. */
  readonly bus: PciBus = new PciBus();
  /** Devices in slot order. */
  readonly placed: PlacedPciDevice[] = [];
  private nextMmio = PCI_MMIO_START;
  private nextIo = PCI_IO_START;
  private readonly fds: number[] = [];
  private readonly routers: VectorRouter[] = [];
  /** Where each BAR of each function decodes now, keyed by "slot:bar". */
  private readonly mappings = new Map<string, Mapping>();
  private readonly notifyFds = new Map<VirtioPci, number[]>();
  /** The shared-register entry of each BAR's ISR, keyed by "slot:bar". */
  private readonly isrEntries = new Map<string, number>();

  /** The bus on `pio` (0xCF8) and `mmio` (ECAM); devices get interrupts through `vm`. */
  constructor(
    private readonly vm: PciVm,
    private readonly pio: Bus,
    private readonly mmio: Bus,
    private readonly memory: GuestMemory,
    private readonly loop: EventLoop,
    private readonly routing: GsiRouting,
    private readonly mmio64: [number, number],
    private readonly shared?: SharedRegisters,
  ) {
    pio.register(0xcf8, 8, this.bus.ports, "PCI config ports");
    mmio.register(ECAM_START, ECAM_SIZE, this.bus.ecam, "PCI ECAM");
  }

  /** Adds `device` on the next free slot, with the interfaces of `kind`. */
  add(device: VirtioDevice, kind: PciTransportKind): PlacedPciDevice {
    const irqFd = sysEventfd();
    const resampleFd = sysEventfd();
    this.fds.push(irqFd, resampleFd);
    const router = this.routing.router(device.queueMaxSizes.length + 1);
    this.routers.push(router);
    // With a shared-register table, vCPU threads answer the ISR register's read-to-clear
    // themselves (the driver reads it on every INTx interrupt): one entry per BAR holding it,
    // moved with the BAR.
    const isrCell = this.shared?.cell();
    const transport = new VirtioPci(device, this.memory, {
      intx: { trigger: () => signalEventfd(irqFd) },
      msi: router,
      flavor: PCI_FLAVOR[kind],
      isr: isrCell,
    });
    const slot = this.bus.add(transport);
    if (isrCell) {
      for (const h of transport.barHandlers()) {
        if (h.isrOffset === undefined) continue;
        // Off until the BAR decodes somewhere (remapBar).
        const entry = this.shared!.map(undefined, SHARED_READ_CLEAR, isrCell, undefined, h.kind === "io");
        this.isrEntries.set(`${slot}:${h.index}`, entry);
      }
    }
    const gsi = PCI_INTX_GSIS[slot % PCI_INTX_GSIS.length];
    this.vm.irqfd(irqFd, gsi, resampleFd);
    // A device on the device thread watches the resample eventfd there.
    if (!(device instanceof RemoteDevice)) {
      this.loop.add(resampleFd, () => {
        if (drainEventfd(resampleFd) && transport.intxPending) signalEventfd(irqFd);
      });
    }
    // Doorbells: one eventfd per queue, registered wherever the BAR is.
    const remote = device instanceof RemoteDevice ? device : undefined;
    const qfds = device.queueMaxSizes.map((_, q) => {
      const fd = sysEventfd();
      this.fds.push(fd);
      // A device on the device thread watches its doorbells there.
      if (!remote) {
        this.loop.add(fd, () => {
          if (drainEventfd(fd)) transport.core.notify(q);
        });
      }
      return fd;
    });
    const isr = transport.core.isr;
    remote?.bind(qfds, {
      isr: { buffer: isr.array.buffer as SharedArrayBuffer, index: isr.index },
      lineFd: irqFd,
      resampleFd,
      msix: { plan: transport.plan.buffer as SharedArrayBuffer, vectorFds: router.eventfds },
    });
    this.notifyFds.set(transport, qfds);
    // The VMM's assignment, as firmware would leave it: memory BARs in the 32-bit window, I/O
    // BARs in the I/O window, decoding on.
    for (const h of transport.barHandlers()) {
      const bar = transport.config.bar(h.index)!;
      const io = h.kind === "io";
      const next = io ? this.nextIo : this.nextMmio;
      const base = Math.ceil(next / h.size) * h.size;
      const limit = io ? PCI_IO_END : PCI_MMIO_START + PCI_MMIO_SIZE;
      if (base + h.size > limit) throw new RangeError(`PCI ${io ? "I/O" : "memory"} window full`);
      if (io) this.nextIo = base + h.size;
      else this.nextMmio = base + h.size;
      bar.lo = base;
      bar.hi = 0;
    }
    const decode = transport.flavor === "modern" ? CMD.MEMORY : CMD.MEMORY | CMD.IO;
    transport.config.setCommand(decode | CMD.BUS_MASTER);
    transport.config.onBarChange = () => this.remap(transport, slot);
    transport.config.onCommandChange = () => this.remap(transport, slot);
    this.remap(transport, slot);
    const placed = { device, transport, slot, gsi };
    this.placed.push(placed);
    return placed;
  }

  /** Whether a BAR may decode where it is: inside a window (not over ECAM, RAM or the APICs). */
  private usable(bar: Bar): boolean {
    const a = bar.address, end = a + bar.size;
    if (!Number.isSafeInteger(end)) return false;
    if (bar.kind === "io") return a >= PCI_IO_START && end <= PCI_IO_END;
    const in32 = a >= PCI_MMIO_START && end <= PCI_MMIO_START + PCI_MMIO_SIZE;
    const in64 = a >= this.mmio64[0] && end <= this.mmio64[1];
    return in32 || in64;
  }

  /** Makes each BAR decode where it and the command register say (or nowhere). */
  private remap(t: VirtioPci, slot: number): void {
    for (const h of t.barHandlers()) this.remapBar(t, slot, h);
  }

  private remapBar(t: VirtioPci, slot: number, h: PciBarHandler): void {
    const key = `${slot}:${h.index}`;
    const bar = t.config.bar(h.index)!;
    const io = h.kind === "io";
    const enabled = t.config.command & (io ? CMD.IO : CMD.MEMORY);
    const want = enabled && this.usable(bar) ? bar.address : undefined;
    const cur = this.mappings.get(key);
    if (cur?.base === want) return;
    const bus = io ? this.pio : this.mmio;
    const isrEntry = this.isrEntries.get(key);
    if (cur) {
      if (isrEntry !== undefined) this.shared!.move(isrEntry, undefined);
      bus.unregister(cur.base);
      for (const d of cur.doorbells) {
        if (d.ok) {
          this.vm.ioeventfd(d.fd, d.addr, d.len, { pio: d.pio, datamatch: d.datamatch, deassign: true });
        }
      }
      this.mappings.delete(key);
    }
    if (want === undefined) return;
    try {
      bus.register(
        want,
        h.size,
        { read: h.read, write: h.write },
        `${t.device.name} (${t.flavor} pci) BAR ${h.index}`,
      );
    } catch {
      return; // over another device's range: the BAR does not decode until moved again
    }
    if (isrEntry !== undefined) this.shared!.move(isrEntry, want + h.isrOffset!);
    const fds = this.notifyFds.get(t) ?? [];
    const doorbells = h.doorbells.map((d) => {
      const door = {
        fd: fds[d.queue],
        addr: want + d.offset,
        len: d.len,
        datamatch: d.datamatch,
        pio: io,
        ok: false,
      };
      try {
        this.vm.ioeventfd(door.fd, door.addr, door.len, { pio: io, datamatch: d.datamatch });
        door.ok = true;
      } catch {
        // The write still reaches the register file through an exit.
      }
      return door;
    });
    this.mappings.set(key, { base: want, doorbells });
  }

  /** What the DSDT says about the host bridge. */
  hostInfo(): PciHostInfo {
    return {
      intx: Array.from({ length: 31 }, (_, i) => i + 1).map((slot) => ({
        slot,
        gsi: PCI_INTX_GSIS[slot % PCI_INTX_GSIS.length],
      })),
      mmio32: [PCI_MMIO_START, PCI_MMIO_START + PCI_MMIO_SIZE],
      mmio64: this.mmio64,
      io: [PCI_IO_START, PCI_IO_END],
    };
  }

  /** Resets the devices and waits for their in-flight I/O, then closes the eventfds. */
  async close(): Promise<void> {
    await Promise.all(this.placed.map((p) => p.transport.core.reset()));
    for (const r of this.routers) r.close();
    for (const fd of this.fds) sysClose(fd);
    this.fds.length = 0;
  }
}
