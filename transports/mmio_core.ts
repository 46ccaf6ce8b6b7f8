/**
 * What virtio-MMIO version 2 (modern) and version 1 (legacy) share on top of the
 * transport-neutral core (virtio_core.ts): the register offsets and the register file
 * base class (virtio 1.2 section 4.2). The version-specific registers are in mmio.ts and
 * mmio_legacy.ts.
 */

import type { VirtioCore } from "./virtio_core.ts";

export { type IrqLine, VirtioCore } from "./virtio_core.ts";

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

/** Reads and writes at offsets of a virtio-MMIO window (what a bus hands a device). */
export interface MmioRegs {
  /** A guest read of `data.length` bytes at `offset`. */
  read(offset: number, data: Uint8Array): void;
  /** A guest write; a promise when it may not be answered yet. */
  write(offset: number, data: Uint8Array): void | Promise<void>;
}

/**
 * A virtio-MMIO register file: config space (any width) and the registers both versions
 * share are handled here; each version adds its own in `readRegister` / `writeRegister`.
 */
export abstract class MmioRegisterFile {
  /** The shared state. */
  abstract readonly core: VirtioCore;

  /** A version-specific register read; undefined if `offset` is not one. */
  protected abstract readRegister(offset: number): number | undefined;
  /** A version-specific register write (a promise while a Status reset waits, see `write`). */
  protected abstract writeRegister(offset: number, v: number): void | Promise<void>;

  private readonly word = new Uint8Array(4);

  /**
   * Copies what a driver reads at byte offsets [from, to) of the window into `words`, whose
   * index `at` is the window's first word: a page the guest reads as memory, so that its
   * reads do not exit. InterruptStatus is left alone: that word is the ISR's cell itself,
   * changed only by whoever sets or clears bits. Only words that changed are stored, each
   * whole, so a driver reading meanwhile sees the old value or the new one.
   *
   * Config space goes first, then the registers (ConfigGeneration among them). A change of
   * several config words cannot be made atomic for a driver reading memory: it compares
   * ConfigGeneration for equality only, so it could read the old generation around a
   * half-stored config. Such a change is stored inside `hold`, which keeps the driver's
   * reads exiting meanwhile (so they wait behind the copy); without `hold` it is stored as
   * it comes (before the guest runs).
   */
  copyTo(
    words: Int32Array,
    at: number,
    from = 0,
    to: number = MMIO_WINDOW,
    hold?: (store: () => void) => void,
  ): void {
    const d = this.word;
    const valueAt = (off: number) => {
      this.read(off, d);
      return u32Of(d) | 0; // as an Int32Array holds it
    };
    if (to > MMIO_CONFIG) {
      let changed: number[] | undefined; // word index, value, ...
      for (let off = Math.max(from, MMIO_CONFIG); off < to; off += 4) {
        const v = valueAt(off);
        if (words[at + off / 4] !== v) (changed ??= []).push(at + off / 4, v);
      }
      if (changed) {
        const list = changed;
        const store = () => {
          for (let i = 0; i < list.length; i += 2) words[list[i]] = list[i + 1];
        };
        if (hold && list.length > 2) hold(store);
        else store();
      }
      to = MMIO_CONFIG;
    }
    for (let off = from; off < to; off += 4) {
      if (off === REG.interruptStatus) continue;
      const v = valueAt(off);
      if (words[at + off / 4] !== v) words[at + off / 4] = v;
    }
  }

  /**
   * Keeps `words` from index `at` a copy of the window (copyTo) from now on: made at once,
   * again after each write handed to the returned register file (before the write is
   * answered: a vCPU resumes only then), and whenever the core reports a change of its own
   * (VirtioCore.onChange); `hold` as for copyTo. Put the returned file where the guest's
   * writes arrive.
   */
  keepCopy(words: Int32Array, at: number, hold?: (store: () => void) => void): MmioRegs {
    const copy = (from?: number, to?: number) => this.copyTo(words, at, from, to, hold);
    this.copyTo(words, at);
    this.core.onChange = () => copy();
    // A register write changes registers only; a config write at most the words it covers
    // (a change beyond them comes with a config change, onChange).
    const after = (o: number, n: number) =>
      o < MMIO_CONFIG ? copy(0, MMIO_CONFIG) : copy(o & ~3, Math.min(MMIO_WINDOW, (o + n + 3) & ~3));
    return {
      read: (o, d) => this.read(o, d),
      write: (o, d) => {
        const pending = this.write(o, d);
        if (pending) return pending.then(() => after(o, d.length));
        after(o, d.length);
      },
    };
  }

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
