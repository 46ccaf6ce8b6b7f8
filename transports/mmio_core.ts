/**
 * What virtio-MMIO version 2 (modern) and version 1 (legacy) share: the status state
 * machine, feature negotiation, queue selection, interrupt status, config generation,
 * activation and reset (virtio 1.2 section 4.2). The register files are in mmio.ts and
 * mmio_legacy.ts; the device never knows which one carries it.
 */

import type { GuestMemory } from "../vmm/memory.ts";
import { privateCell, type SharedCell } from "../vmm/shared_regs.ts";
import { STATUS, type VirtioDevice, type VirtioInterrupt } from "../devices/virtio/device.ts";
import { SplitQueue, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC } from "../devices/virtio/queue.ts";

/** "virt" */
export const MMIO_MAGIC = 0x74726976;
/** Our vendor ID ("TSVM" would not fit a spec'd vendor; QEMU's 0x554d4551 style). */
export const MMIO_VENDOR = 0x4d565354;
/** Size of a virtio-MMIO window. */
export const MMIO_WINDOW = 0x1000;
/** QueueNotify offset (an ioeventfd with datamatch = queue index sits here). */
export const MMIO_QUEUE_NOTIFY = 0x050;
/** Start of device config space. */
export const MMIO_CONFIG = 0x100;

/** Register offsets shared by both versions. */
export const REG = {
  magic: 0x000,
  version: 0x004,
  deviceId: 0x008,
  vendorId: 0x00c,
  deviceFeatures: 0x010,
  deviceFeaturesSel: 0x014,
  driverFeatures: 0x020,
  driverFeaturesSel: 0x024,
  queueSel: 0x030,
  queueNumMax: 0x034,
  queueNum: 0x038,
  queueReady: 0x044,
  queueNotify: 0x050,
  interruptStatus: 0x060,
  interruptAck: 0x064,
  status: 0x070,
  queueDescLow: 0x080,
  queueDescHigh: 0x084,
  queueDriverLow: 0x090,
  queueDriverHigh: 0x094,
  queueDeviceLow: 0x0a0,
  queueDeviceHigh: 0x0a4,
  configGeneration: 0x0fc,
} as const;

/** Reads/writes a 32-bit little-endian register value from an access buffer. */
export function u32Of(data: Uint8Array): number {
  return (data[0] | (data[1] << 8) | (data[2] << 16) | (data[3] << 24)) >>> 0;
}

/** Fills a read buffer with a 32-bit value. */
export function putU32(data: Uint8Array, v: number): void {
  for (let i = 0; i < data.length; i++) data[i] = i < 4 ? (v >>> (8 * i)) & 0xff : 0;
}

/** An interrupt line the transport raises (an irqfd in the VMM, a counter in tests). */
export interface IrqLine {
  /** Raises the interrupt (edge). */
  trigger(): void;
}

/** Interrupt status bits. */
export const INT_USED_RING = 1;
/** Config change interrupt. */
export const INT_CONFIG = 2;

/** Shared state of one virtio-MMIO device. */
export class MmioCore implements VirtioInterrupt {
  /** Device status register. */
  status = 0;
  /** Feature word selectors. */
  deviceFeaturesSel = 0;
  /** Driver feature word selector. */
  driverFeaturesSel = 0;
  /** Features the driver has written so far. */
  driverFeatures = 0n;
  /** Selected queue. */
  queueSel = 0;
  /**
   * InterruptStatus lives in a shared cell: in the VMM the vCPU threads answer the
   * driver's InterruptStatus reads and InterruptACK writes from it (vmm/shared_regs.ts).
   */
  readonly isr: SharedCell;
  /** ConfigGeneration. */
  configGeneration = 0;
  /** The device's queues. */
  readonly queues: SplitQueue[];
  /** Whether the device has been activated (DRIVER_OK accepted). */
  activated = false;
  /**
   * Set while a reset waits for the device's in-flight work: Status keeps reading its old
   * value, notifications are ignored, and the Status write that asked for it is answered
   * only when this settles.
   */
  resetting: Promise<void> | undefined;
  /** The last reason the device asked for a reset (for logs and tests). */
  lastError: string | undefined;
  /** Counters for diagnostics: notifications taken, notifications ignored, interrupts raised. */
  readonly counters = { notifies: 0, ignoredNotifies: 0, interrupts: 0 };

  /**
   * A core for `device` over `memory`; `offered` is the full feature set this transport
   * offers (device features plus transport bits such as VERSION_1).
   */
  constructor(
    readonly device: VirtioDevice,
    readonly memory: GuestMemory,
    readonly irq: IrqLine,
    readonly offered: bigint,
    readonly modern: boolean,
    isr: SharedCell = privateCell(),
  ) {
    this.queues = device.queueMaxSizes.map((m) => new SplitQueue(m));
    this.isr = isr;
    Atomics.store(isr.array, isr.index, 0);
  }

  /** InterruptStatus. */
  get interruptStatus(): number {
    return Atomics.load(this.isr.array, this.isr.index);
  }

  private raise(bits: number): void {
    Atomics.or(this.isr.array, this.isr.index, bits);
    this.irq.trigger();
  }

  /** The selected queue, or undefined if QueueSel is out of range. */
  get queue(): SplitQueue | undefined {
    return this.queues[this.queueSel];
  }

  /** Whether queue fields may still be written (before DRIVER_OK). */
  get queueWritable(): boolean {
    return (this.status & STATUS.DRIVER_OK) === 0;
  }

  /** 32 bits of the offered features at word `sel`. */
  deviceFeatureWord(sel: number): number {
    if (sel > 1) return 0;
    return Number((this.offered >> BigInt(32 * sel)) & 0xffff_ffffn);
  }

  /** Stores 32 bits of driver features at word `sel` (ignored once FEATURES_OK is set). */
  setDriverFeatureWord(sel: number, v: number): void {
    if (sel > 1 || (this.status & STATUS.FEATURES_OK)) return;
    const shift = BigInt(32 * sel);
    this.driverFeatures = (this.driverFeatures & ~(0xffff_ffffn << shift)) | (BigInt(v >>> 0) << shift);
  }

  /**
   * A driver write to Status. The register is 8 bits wide: a value whose low byte is 0
   * resets. Otherwise the driver may only set bits (virtio 1.2 section 2.1.2: it must not
   * clear one); a write that would clear a bit is ignored. DRIVER_OK activates only when
   * the device does not need a reset. Returns a promise when the reset must wait for the
   * device's in-flight work (see `resetting`).
   */
  writeStatus(value: number): void | Promise<void> {
    const v = value & 0xff;
    if (v === 0) return this.reset();
    if (this.resetting) return this.resetting;
    let next = v & ~STATUS.DEVICE_NEEDS_RESET;
    const had = this.status & ~STATUS.DEVICE_NEEDS_RESET;
    if (had & ~next) {
      this.lastError = `driver tried to clear status bits 0x${(had & ~next).toString(16)}; ignored`;
      return;
    }
    if ((next & STATUS.FEATURES_OK) && !(had & STATUS.FEATURES_OK)) {
      // Refuse FEATURES_OK if the driver acknowledged anything we did not offer.
      if (this.driverFeatures & ~this.offered) next &= ~STATUS.FEATURES_OK;
    }
    this.status = next | (this.status & STATUS.DEVICE_NEEDS_RESET);
    if (!(had & STATUS.DRIVER_OK) && (next & STATUS.DRIVER_OK)) {
      if (this.status & STATUS.DEVICE_NEEDS_RESET) return; // stays stopped until a reset
      this.activate();
    }
  }

  private activate(): void {
    if (this.modern && !(this.status & STATUS.FEATURES_OK)) {
      this.needsReset("DRIVER_OK without FEATURES_OK");
      return;
    }
    const features = this.driverFeatures & this.offered;
    for (const q of this.queues) {
      if (!q.ready) continue;
      const why = q.validate(this.memory);
      if (why) {
        this.needsReset(why);
        return;
      }
      q.indirect = (features & (1n << VIRTIO_F_INDIRECT_DESC)) !== 0n;
      q.eventIdx = (features & (1n << VIRTIO_F_EVENT_IDX)) !== 0n;
    }
    this.activated = true;
    try {
      this.device.activate({ memory: this.memory, queues: this.queues, features, interrupt: this });
    } catch (e) {
      this.activated = false;
      this.needsReset(`activation failed: ${(e as Error).message}`);
    }
  }

  /** A driver notification (QueueNotify write or ioeventfd) for queue `index`. */
  notify(index: number): void {
    const q = Number.isInteger(index) ? this.queues[index] : undefined;
    if (!this.activated || (this.status & STATUS.DEVICE_NEEDS_RESET) || !q || !q.ready) {
      this.counters.ignoredNotifies++;
      return;
    }
    this.counters.notifies++;
    this.device.notify(index);
  }

  /** A one-line summary of the transport state, for failure reports. */
  describe(): string {
    const qs = this.queues.map((q, i) =>
      `q${i}:${q.ready ? "ready" : "off"} size=${q.size} avail=${q.nextAvail} used=${q.nextUsed}`
    ).join(" ");
    const c = this.counters;
    return `${this.device.name} status=0x${this.status.toString(16)} features=0x${
      (this.driverFeatures & this.offered).toString(16)
    } isr=${this.interruptStatus} notifies=${c.notifies} ignored=${c.ignoredNotifies} irqs=${c.interrupts} ${qs}` +
      (this.lastError ? ` error="${this.lastError}"` : "");
  }

  /** InterruptACK. */
  ack(bits: number): void {
    Atomics.and(this.isr.array, this.isr.index, ~bits);
  }

  /**
   * Writing 0 to Status: everything back to its initial state. The device stops at once;
   * if it still has work touching guest memory, the state is cleared (and Status reads 0)
   * only when that work has finished, and the returned promise settles then.
   */
  reset(): void | Promise<void> {
    if (this.resetting) return this.resetting;
    this.activated = false;
    const quiet = this.device.reset();
    if (!quiet) {
      this.clear();
      return;
    }
    this.resetting = quiet.then(() => {
      this.resetting = undefined;
      this.clear();
    });
    return this.resetting;
  }

  private clear(): void {
    for (const q of this.queues) q.reset();
    this.status = 0;
    this.deviceFeaturesSel = this.driverFeaturesSel = 0;
    this.driverFeatures = 0n;
    this.queueSel = 0;
    Atomics.store(this.isr.array, this.isr.index, 0);
    this.activated = false;
  }

  /** The driver disabled queue `index` (QueueReady 0, QueuePFN 0): it is not served any more. */
  disableQueue(index: number): void {
    const q = this.queues[index];
    if (q) q.ready = false;
  }

  /** VirtioInterrupt: used buffers on queue `index`. */
  signalUsed(_index: number): void {
    this.counters.interrupts++;
    this.raise(INT_USED_RING);
  }

  /** VirtioInterrupt: config space changed. */
  signalConfig(): void {
    this.configGeneration = (this.configGeneration + 1) >>> 0;
    this.raise(INT_CONFIG);
  }

  /** VirtioInterrupt: a driver error the device cannot go on from. */
  needsReset(reason: string): void {
    this.lastError = reason;
    if (this.status & STATUS.DEVICE_NEEDS_RESET) return;
    this.status |= STATUS.DEVICE_NEEDS_RESET;
    this.activated = false;
    // In-flight work finishes on its own; the driver's reset waits for it.
    void this.device.reset();
    if (this.status & STATUS.DRIVER_OK) this.signalConfig();
  }
}

/**
 * A virtio-MMIO register file: config space (any width) and the registers both versions
 * share are handled here; each version adds its own in `readRegister` / `writeRegister`.
 */
export abstract class MmioRegisterFile {
  /** The shared state. */
  abstract readonly core: MmioCore;

  /** A version-specific register read; undefined if `offset` is not one. */
  protected abstract readRegister(offset: number): number | undefined;
  /** A version-specific register write (a promise while a Status reset waits, see `write`). */
  protected abstract writeRegister(offset: number, v: number): void | Promise<void>;

  /** A guest read. */
  read(offset: number, data: Uint8Array): void {
    const c = this.core;
    if (offset >= MMIO_CONFIG) {
      c.device.readConfig(offset - MMIO_CONFIG, data);
      return;
    }
    if (data.length !== 4) {
      data.fill(0); // registers are 32 bits wide (virtio 1.2 section 4.2.2.2)
      return;
    }
    let v: number | undefined;
    switch (offset) {
      case REG.magic:
        v = MMIO_MAGIC;
        break;
      case REG.version:
        v = c.modern ? 2 : 1;
        break;
      case REG.deviceId:
        v = c.device.deviceType;
        break;
      case REG.vendorId:
        v = MMIO_VENDOR;
        break;
      case REG.queueNumMax:
        v = c.queue?.maxSize ?? 0;
        break;
      case REG.interruptStatus:
        v = c.interruptStatus;
        break;
      case REG.status:
        v = c.status;
        break;
      default:
        v = this.readRegister(offset);
    }
    putU32(data, v ?? 0);
  }

  /**
   * A guest write. Returns a promise when the write may not be answered yet (a reset
   * waiting for in-flight I/O): the vCPU that wrote stays in its exit until it settles.
   */
  write(offset: number, data: Uint8Array): void | Promise<void> {
    const c = this.core;
    if (offset >= MMIO_CONFIG) {
      c.device.writeConfig(offset - MMIO_CONFIG, data);
      return;
    }
    if (data.length !== 4) return;
    const v = u32Of(data);
    switch (offset) {
      case REG.deviceFeaturesSel:
        c.deviceFeaturesSel = v;
        break;
      case REG.driverFeaturesSel:
        c.driverFeaturesSel = v;
        break;
      case REG.queueSel:
        c.queueSel = v;
        break;
      case REG.queueNotify:
        // The whole value is the queue index (no VIRTIO_F_NOTIFICATION_DATA): 0x10000 is
        // no queue, not queue 0.
        c.notify(v);
        break;
      case REG.interruptAck:
        c.ack(v);
        break;
      default:
        return this.writeRegister(offset, v);
    }
  }
}
