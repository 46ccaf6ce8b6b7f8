/**
 * The transport-neutral virtio core (virtio 1.2 sections 2 and 3): the status state
 * machine, feature negotiation, queue selection and configuration, activation, quiet
 * reset, NEEDS_RESET, config generation, and interrupts through a per-transport strategy
 * (one ISR + line for virtio-MMIO and PCI INTx; one vector per queue or config for
 * MSI-X). Register files (mmio.ts, mmio_legacy.ts, pci.ts, pci_legacy.ts) are thin tables over it.
 */

import type { GuestMemory } from "../vmm/memory.ts";
import { privateCell, type SharedCell } from "../vmm/shared_regs.ts";
import { STATUS, type VirtioDevice, type VirtioInterrupt } from "../devices/virtio/device.ts";
import { SplitQueue, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC } from "../devices/virtio/queue.ts";

/** The little-endian value of a register access's bytes (up to 6 bytes exactly). */
export function leValue(data: Uint8Array): number {
  let v = 0;
  for (let i = data.length - 1; i >= 0; i--) v = v * 256 + data[i];
  return v;
}

/** Fills a read's bytes with `v`, little-endian (bytes past the 6th read 0). */
export function putLe(data: Uint8Array, v: number): void {
  for (let i = 0; i < data.length; i++) data[i] = i < 6 ? Math.floor(v / 2 ** (8 * i)) & 0xff : 0;
}

/** An interrupt line the transport raises (an irqfd in the VMM, a counter in tests). */
export interface IrqLine {
  /** Raises the interrupt (ISR bits were set). */
  trigger(): void;
  /**
   * ISR bits were cleared (InterruptACK, a read-to-clear ISR, a reset): a line that follows
   * the ISR (virtio-MMIO's, vmm/isr_line.ts) drops once it reads zero.
   */
  lower?(): void;
}

/** Interrupt status bits. */
export const INT_USED_RING = 1;
/** Config change interrupt. */
export const INT_CONFIG = 2;

/**
 * How a transport tells the driver about used buffers and config changes. Returns
 * nothing; the default (no strategy) sets the ISR bit and raises the line.
 */
export interface InterruptStrategy {
  /** Used buffers on queue `index`. */
  used(index: number): void;
  /** The config space changed. */
  config(): void;
}

/** Shared state of one virtio device, whatever transport carries it. */
export class VirtioCore implements VirtioInterrupt {
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
    public offered: bigint,
    public modern: boolean,
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

  /** Sets ISR bits and raises the line (the interrupt of virtio-MMIO and PCI INTx). */
  raiseIsr(bits: number): void {
    Atomics.or(this.isr.array, this.isr.index, bits);
    this.irq.trigger();
  }

  /** Reads and clears the ISR (PCI's read-to-clear ISR register). */
  takeIsr(): number {
    const v = Atomics.exchange(this.isr.array, this.isr.index, 0);
    if (v !== 0) this.irq.lower?.();
    return v;
  }

  /** The transport's interrupt strategy (undefined: ISR + line). */
  interrupts: InterruptStrategy | undefined;
  /** Called when a reset has completed (the transport clears its own registers). */
  onReset: (() => void) | undefined;
  /**
   * Called when a value the driver reads changed other than by a register write: a reset
   * completing, NEEDS_RESET, a config change (a copy of the registers follows it).
   */
  onChange: (() => void) | undefined;

  /** The selected queue, or undefined if QueueSel is out of range. */
  get queue(): SplitQueue | undefined {
    return this.queues[this.queueSel];
  }

  /** Whether queue fields may still be written (before DRIVER_OK). */
  get queueWritable(): boolean {
    return (this.status & STATUS.DRIVER_OK) === 0;
  }

  /** 32 bits of the features the driver wrote at word `sel`. */
  driverFeatureWord(sel: number): number {
    if (sel > 1) return 0;
    return Number((this.driverFeatures >> BigInt(32 * sel)) & 0xffff_ffffn);
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
      (this.lastError ? ` error="${this.lastError}"` : "") +
      (this.device.describe ? ` | ${this.device.describe()}` : "");
  }

  /** InterruptACK. */
  ack(bits: number): void {
    const old = Atomics.and(this.isr.array, this.isr.index, ~bits);
    if (old !== 0 && (old & ~bits) === 0) this.irq.lower?.();
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
    if (Atomics.exchange(this.isr.array, this.isr.index, 0) !== 0) this.irq.lower?.();
    this.activated = false;
    this.onReset?.();
    this.onChange?.();
  }

  /** The driver disabled queue `index` (QueueReady 0, QueuePFN 0): it is not served any more. */
  disableQueue(index: number): void {
    const q = this.queues[index];
    if (q) q.ready = false;
  }

  /** VirtioInterrupt: used buffers on queue `index`. */
  signalUsed(index: number): void {
    this.counters.interrupts++;
    if (this.interrupts) this.interrupts.used(index);
    else this.raiseIsr(INT_USED_RING);
  }

  /** VirtioInterrupt: config space changed. */
  signalConfig(): void {
    this.configGeneration = (this.configGeneration + 1) >>> 0;
    this.onChange?.();
    if (this.interrupts) this.interrupts.config();
    else this.raiseIsr(INT_CONFIG);
  }

  /** VirtioInterrupt: a driver error the device cannot go on from. */
  needsReset(reason: string): void {
    this.lastError = reason;
    if (this.status & STATUS.DEVICE_NEEDS_RESET) return;
    this.status |= STATUS.DEVICE_NEEDS_RESET;
    this.activated = false;
    // In-flight work finishes on its own; the driver's reset waits for it.
    void this.device.reset();
    // A config change reports the new Status with it.
    if (this.status & STATUS.DRIVER_OK) this.signalConfig();
    else this.onChange?.();
  }
}
