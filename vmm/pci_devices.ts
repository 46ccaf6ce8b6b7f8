/**
 * The VM's PCI bus: the host bridge and config access (ports 0xCF8-0xCFF and ECAM), and
 * virtio devices on it. The VMM assigns each BAR inside the host bridge's windows (there
 * is no firmware) and enables decoding; a guest that moves a BAR or turns decoding off
 * moves the device with it: its MMIO range and doorbell ioeventfds are re-registered at
 * the new address, or dropped while decoding is off or the address is unusable (outside
 * the window or over another range), never a crash. INTx is a level-triggered IOAPIC pin
 * shared by every fourth device (irqfd with resample, re-raised while the ISR is set);
 * MSI-X vectors are KVM MSI routes with irqfds (irq_routing.ts).
 */

import type { VmFd } from "./vm.ts";
import type { Bus } from "./bus.ts";
import type { GuestMemory } from "./memory.ts";
import type { EventLoop } from "./event_loop.ts";
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
import { MODERN_BAR, VirtioPciModern } from "../transports/pci_modern.ts";

/** The VM operations the PCI bus uses (a VmFd; tests record them). */
export type PciVm = Pick<VmFd, "irqfd" | "irqfdDeassign" | "ioeventfd" | "setGsiRouting">;

/** The virtio-PCI flavours. */
export type PciTransportKind = "pci";

/** One virtio device on the bus. */
export interface PlacedPciDevice {
  /** The device. */
  device: VirtioDevice;
  /** Its transport. */
  transport: VirtioPciModern;
  /** Device number on bus 0. */
  slot: number;
  /** INTx GSI. */
  gsi: number;
}

interface Mapping {
  base: number;
  notifyFds: Array<{ fd: number; addr: number; ok: boolean }>;
}

/** The PCI bus of one VM and the virtio devices on it. */
export class PciDevices {
  /** Bus 0. */
  readonly bus: PciBus = new PciBus();
  /** Devices in slot order. */
  readonly placed: PlacedPciDevice[] = [];
  private nextMmio = PCI_MMIO_START;
  private readonly fds: number[] = [];
  private readonly routers: VectorRouter[] = [];
  private readonly mappings = new Map<VirtioPciModern, Mapping | undefined>();
  private readonly notifyFds = new Map<VirtioPciModern, number[]>();

  /** The bus on `pio` (0xCF8) and `mmio` (ECAM); devices get interrupts through `vm`. */
  constructor(
    private readonly vm: PciVm,
    private readonly pio: Bus,
    private readonly mmio: Bus,
    private readonly memory: GuestMemory,
    private readonly loop: EventLoop,
    private readonly routing: GsiRouting,
    private readonly mmio64: [number, number],
  ) {
    pio.register(0xcf8, 8, this.bus.ports, "PCI config ports");
    mmio.register(ECAM_START, ECAM_SIZE, this.bus.ecam, "PCI ECAM");
  }

  /** Adds `device` on the next free slot. */
  add(device: VirtioDevice, _kind: PciTransportKind): PlacedPciDevice {
    const irqFd = sysEventfd();
    const resampleFd = sysEventfd();
    this.fds.push(irqFd, resampleFd);
    const router = this.routing.router(device.queueMaxSizes.length + 1);
    this.routers.push(router);
    const transport = new VirtioPciModern(device, this.memory, {
      intx: { trigger: () => signalEventfd(irqFd) },
      msi: router,
    });
    const slot = this.bus.add(transport);
    const gsi = PCI_INTX_GSIS[slot % PCI_INTX_GSIS.length];
    this.vm.irqfd(irqFd, gsi, resampleFd);
    this.loop.add(resampleFd, () => {
      if (drainEventfd(resampleFd) && transport.intxPending) signalEventfd(irqFd);
    });
    // Doorbells: one eventfd per queue, registered wherever the BAR is.
    const qfds = device.queueMaxSizes.map((_, q) => {
      const fd = sysEventfd();
      this.fds.push(fd);
      this.loop.add(fd, () => {
        if (drainEventfd(fd)) transport.core.notify(q);
      });
      return fd;
    });
    this.notifyFds.set(transport, qfds);
    // The VMM's assignment, as firmware would leave it: BAR in the 32-bit window, decoding on.
    const size = MODERN_BAR.size;
    const base = Math.ceil(this.nextMmio / size) * size;
    if (base + size > PCI_MMIO_START + PCI_MMIO_SIZE) throw new RangeError("PCI memory window full");
    this.nextMmio = base + size;
    const bar = transport.config.bar(MODERN_BAR.index)!;
    bar.lo = base;
    bar.hi = 0;
    transport.config.setCommand(CMD.MEMORY | CMD.BUS_MASTER);
    this.mappings.set(transport, undefined);
    transport.config.onBarChange = () => this.remap(transport);
    transport.config.onCommandChange = () => this.remap(transport);
    this.remap(transport);
    const placed = { device, transport, slot, gsi };
    this.placed.push(placed);
    return placed;
  }

  /** Whether a memory BAR at [base, base+size) may decode: inside a window, not over ECAM. */
  private usable(bar: Bar): boolean {
    const a = bar.address, end = a + bar.size;
    if (!Number.isSafeInteger(end)) return false;
    const in32 = a >= PCI_MMIO_START && end <= PCI_MMIO_START + PCI_MMIO_SIZE;
    const in64 = a >= this.mmio64[0] && end <= this.mmio64[1];
    return in32 || in64;
  }

  /** Makes the device decode where its BAR and command register say (or nowhere). */
  private remap(t: VirtioPciModern): void {
    const bar = t.config.bar(MODERN_BAR.index)!;
    const want = (t.config.command & CMD.MEMORY) && this.usable(bar) ? bar.address : undefined;
    const cur = this.mappings.get(t);
    if (cur?.base === want) return;
    if (cur) {
      this.mmio.unregister(cur.base);
      for (const n of cur.notifyFds) {
        if (n.ok) this.vm.ioeventfd(n.fd, n.addr, 2, { deassign: true });
      }
      this.mappings.set(t, undefined);
    }
    if (want === undefined) return;
    try {
      this.mmio.register(want, MODERN_BAR.size, {
        read: (o, d) => t.barRead(o, d),
        write: (o, d) => t.barWrite(o, d),
      }, `${t.device.name} (pci)`);
    } catch {
      return; // over another device's range: the BAR does not decode until moved again
    }
    const notifyFds = (this.notifyFds.get(t) ?? []).map((fd, q) => {
      const addr = want + VirtioPciModern.notifyOffset(q);
      try {
        this.vm.ioeventfd(fd, addr, 2);
        return { fd, addr, ok: true };
      } catch {
        return { fd, addr, ok: false }; // the write still reaches barWrite through an exit
      }
    });
    this.mappings.set(t, { base: want, notifyFds });
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
