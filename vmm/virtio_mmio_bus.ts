/**
 * Puts virtio devices on virtio-MMIO windows: a window and a GSI each, and an ioeventfd per
 * queue on QueueNotify (datamatch = queue index) served by the event loop, so the
 * notification path never exits to a vCPU handler in userspace.
 *
 * The interrupt is level-triggered, as the InterruptStatus register it mirrors: the line is
 * up exactly while InterruptStatus is not zero, set with KVM_IRQ_LINE by whichever thread
 * changed the register (vmm/isr_line.ts): the device thread when it sets a bit, the vCPU
 * thread that answers the driver's InterruptACK, the main thread on a config change or a
 * reset. An edge could be lost when it arrived while the previous one was being handled; a
 * level cannot.
 *
 * Where KVM has read-only memory, each window is also a read-only memory slot over a page
 * that holds a copy of what the driver reads there (SharedRegisters.page): the driver's
 * register reads, InterruptStatus on every interrupt among them, are served by the guest's
 * own loads without exiting; its writes still exit as MMIO writes (QueueNotify's ioeventfd
 * matches as before) and the copy is brought up to date before the writing vCPU resumes.
 * InterruptStatus is a cell in that page, so a raise or an ACK is seen at once.
 */

import type { VmFd } from "./vm.ts";
import type { Bus, BusDevice } from "./bus.ts";
import type { GuestMemory } from "./memory.ts";
import { RemoteDevice } from "./device_thread.ts";
import type { EventLoop } from "./event_loop.ts";
import { drainEventfd } from "./event_loop.ts";
import { followIsr } from "./isr_line.ts";
import { sysClose, sysEventfd } from "./sys/libc.ts";
import { VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START } from "./arch/x86_64/layout.ts";
import type { VirtioDevice } from "../devices/virtio/device.ts";
import { MMIO_QUEUE_NOTIFY, VirtioMmio } from "../transports/mmio.ts";
import { VirtioMmioLegacy } from "../transports/mmio_legacy.ts";
import type { MmioDeviceInfo } from "./arch/x86_64/acpi.ts";
import { REG } from "../transports/mmio_core.ts";
import { SHARED_CLEAR, SHARED_READ, type SharedRegisters } from "./shared_regs.ts";

/** The virtio-MMIO versions. */
export type MmioTransportKind = "mmio" | "mmio-legacy";

/**
 * GSIs for virtio-MMIO devices: IOAPIC pins not used by the legacy ISA devices we emulate,
 * and below the PCI INTx pins (layout.ts PCI_INTX_GSIS, 20-23).
 */
export const VIRTIO_MMIO_GSIS: readonly number[] = [5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19];

/** One placed device. */
export interface PlacedDevice {
  /** The device. */
  device: VirtioDevice;
  /** Its transport (register file + core). */
  transport: VirtioMmio | VirtioMmioLegacy;
  /** Window and GSI, for the DSDT. */
  info: MmioDeviceInfo;
}

/** The VM's virtio-MMIO devices. */
export class VirtioMmioDevices {
  /** Devices in window order. */
  readonly placed: PlacedDevice[] = [];
  private readonly fds: number[] = [];

  /**
   * Devices on `mmio`, interrupts on `vm`'s lines, notifications through `loop`; the vCPU
   * threads answer the interrupt registers from `shared` (made for `vm`'s fd). With
   * `pageSlot`, the windows' register pages are read-only memory slots `pageSlot`,
   * `pageSlot + 1`, ... (the caller checked KVM_CAP_READONLY_MEM).
   */
  constructor(
    private readonly vm: VmFd,
    private readonly mmio: Bus,
    private readonly memory: GuestMemory,
    private readonly loop: EventLoop,
    private readonly shared: SharedRegisters,
    private readonly pageSlot?: number,
  ) {}

  /** Adds a device on the next window. */
  add(device: VirtioDevice, kind: MmioTransportKind): PlacedDevice {
    const i = this.placed.length;
    if (i >= VIRTIO_MMIO_GSIS.length) {
      throw new RangeError(`at most ${VIRTIO_MMIO_GSIS.length} virtio-mmio devices`);
    }
    const base = VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE;
    const gsi = VIRTIO_MMIO_GSIS[i];
    // InterruptStatus and InterruptACK are answered on the vCPU threads (same offsets in
    // both versions), so taking an interrupt costs the driver no device-thread handoff; an
    // ACK that clears the last bit lowers the line there.
    const page = this.pageSlot === undefined ? undefined : this.shared.page();
    const isr = page ? this.shared.cellIn(page, REG.interruptStatus) : this.shared.cell();
    this.shared.map(base + REG.interruptStatus, SHARED_READ, isr);
    this.shared.map(base + REG.interruptAck, SHARED_CLEAR, isr, gsi);
    const follow = () => followIsr(this.vm.fd, gsi, isr.array, isr.index);
    const irq = { trigger: follow, lower: follow };
    const transport = kind === "mmio"
      ? new VirtioMmio(device, this.memory, irq, isr)
      : new VirtioMmioLegacy(device, this.memory, irq, isr);
    let onBus: BusDevice = transport;
    if (page) {
      const slot = this.pageSlot! + i;
      const map = (size: number) => this.vm.setUserMemoryRegion(slot, base, size, page.hostAddr, true);
      // While several config words change the slot is gone: the driver's reads exit, and the
      // main thread answers them after the copy.
      onBus = transport.keepCopy(page.words, page.at, (store) => {
        map(0);
        try {
          store();
        } finally {
          map(VIRTIO_MMIO_SIZE);
        }
      });
      map(VIRTIO_MMIO_SIZE);
    }
    this.mmio.register(base, VIRTIO_MMIO_SIZE, onBus, `${device.name} (${kind})`);
    const notifyFds = device.queueMaxSizes.map((_, q) => {
      const fd = sysEventfd();
      this.fds.push(fd);
      this.vm.ioeventfd(fd, base + MMIO_QUEUE_NOTIFY, 4, { datamatch: q });
      // A device on the device thread watches its doorbells there.
      if (!(device instanceof RemoteDevice)) {
        this.loop.add(fd, () => {
          if (drainEventfd(fd)) transport.core.notify(q);
        });
      }
      return fd;
    });
    if (device instanceof RemoteDevice) {
      device.bind(notifyFds, {
        isr: { buffer: isr.array.buffer as SharedArrayBuffer, index: isr.index },
        line: { vmFd: this.vm.fd, gsi },
      });
    }
    const placed = { device, transport, info: { base, size: VIRTIO_MMIO_SIZE, gsi } };
    this.placed.push(placed);
    return placed;
  }

  /**
   * Resets the devices, waits until none has I/O in flight (so nothing reads or writes
   * guest RAM or an image afterwards), then closes the eventfds. Call after the vCPUs and
   * the event loop stopped, before the images are closed and RAM is unmapped.
   */
  async close(): Promise<void> {
    await Promise.all(this.placed.map((p) => p.transport.core.reset()));
    for (const fd of this.fds) sysClose(fd);
    this.fds.length = 0;
  }
}
