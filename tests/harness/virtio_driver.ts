/**
 * A driver-side virtio harness in plain memory (no KVM): guest RAM as an ArrayBuffer,
 * split queues laid out and filled the way a driver does, and a virtio-MMIO register
 * driver. Tests use it to drive devices and transports, and to feed them hostile input.
 */

import { GuestMemory } from "../../vmm/memory.ts";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../../devices/virtio/chain.ts";
import { STATUS } from "../../devices/virtio/device.ts";

/** Guest RAM with a bump allocator. */
export class GuestRam {
  /** The memory devices see. */
  readonly mem: GuestMemory;
  /** The raw bytes. */
  readonly bytes: Uint8Array;
  private next: number;

  /** `size` bytes of RAM at guest address `base` (in `bytes` when given: host memory a device thread maps). */
  constructor(size = 1 << 20, readonly base = 0, bytes?: Uint8Array) {
    this.bytes = bytes ?? new Uint8Array(size);
    this.mem = new GuestMemory([{ gpa: base, bytes: this.bytes }]);
    this.next = base + 0x1000;
  }

  /** Allocates `size` bytes aligned to `align`. */
  alloc(size: number, align = 16): number {
    const a = Math.ceil(this.next / align) * align;
    this.next = a + size;
    if (this.next > this.base + this.bytes.length) throw new RangeError("harness RAM exhausted");
    return a;
  }

  /** A view of guest memory. */
  view(gpa: number, len: number): Uint8Array {
    return this.mem.view(gpa, len);
  }

  /** A DataView of guest memory. */
  dv(gpa: number, len: number): DataView {
    return this.mem.dataView(gpa, len);
  }
}

/** One buffer of a chain. */
export interface Buf {
  /** Guest address. */
  addr: number;
  /** Length. */
  len: number;
  /** Device-writable. */
  write?: boolean;
}

/** A split queue as the driver owns it. */
export class DriverQueue {
  /** Ring addresses. */
  readonly descAddr: number;
  /** Available ring. */
  readonly availAddr: number;
  /** Used ring. */
  readonly usedAddr: number;
  private freeHead = 0;
  private availIdx = 0;
  private lastUsed = 0;

  /** Allocates rings for `size` entries in `ram`. */
  constructor(readonly ram: GuestRam, readonly size: number) {
    this.descAddr = ram.alloc(16 * size, 16);
    this.availAddr = ram.alloc(6 + 2 * size, 2);
    this.usedAddr = ram.alloc(6 + 8 * size, 4);
  }

  /** Writes descriptor `i` raw (for hostile tests too). */
  setDesc(
    i: number,
    addr: number | bigint,
    len: number,
    flags: number,
    next: number,
    table = this.descAddr,
  ): void {
    const dv = this.ram.dv(table + 16 * i, 16);
    dv.setBigUint64(0, BigInt(addr), true);
    dv.setUint32(8, len >>> 0, true);
    dv.setUint16(12, flags, true);
    dv.setUint16(14, next, true);
  }

  /** Puts head `head` in the next avail slot and publishes it (avail.idx += 1). */
  publish(head: number): void {
    const dv = this.ram.dv(this.availAddr, 6 + 2 * this.size);
    dv.setUint16(4 + 2 * (this.availIdx % this.size), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    // The indices the device reads while we write them go through GuestMemory's u16
    // accessors: one 16-bit store (a DataView may write the two bytes one at a time).
    this.ram.mem.setU16(this.availAddr + 2, this.availIdx);
  }

  /** Sets avail.idx directly (hostile tests). */
  setAvailIdx(v: number): void {
    this.ram.mem.setU16(this.availAddr + 2, v);
  }

  /** Sets avail.flags (1 = no interrupt). */
  setAvailFlags(v: number): void {
    this.ram.mem.setU16(this.availAddr, v);
  }

  /** Sets used_event (event index). */
  setUsedEvent(v: number): void {
    this.ram.mem.setU16(this.availAddr + 4 + 2 * this.size, v);
  }

  /** avail_event as the device last wrote it. */
  availEvent(): number {
    return this.ram.mem.u16(this.usedAddr + 4 + 8 * this.size);
  }

  /** Adds a chain of buffers (optionally through an indirect table) and publishes it. */
  add(bufs: Buf[], opts: { indirect?: boolean } = {}): number {
    const head = this.freeHead;
    if (opts.indirect) {
      const table = this.ram.alloc(16 * bufs.length, 16);
      bufs.forEach((b, i) =>
        this.setDesc(
          i,
          b.addr,
          b.len,
          (b.write ? VIRTQ_DESC_F_WRITE : 0) | (i < bufs.length - 1 ? VIRTQ_DESC_F_NEXT : 0),
          i + 1,
          table,
        )
      );
      this.setDesc(head, table, 16 * bufs.length, VIRTQ_DESC_F_INDIRECT, 0);
      this.freeHead = (head + 1) % this.size;
    } else {
      bufs.forEach((b, i) => {
        const idx = (head + i) % this.size;
        this.setDesc(
          idx,
          b.addr,
          b.len,
          (b.write ? VIRTQ_DESC_F_WRITE : 0) | (i < bufs.length - 1 ? VIRTQ_DESC_F_NEXT : 0),
          (idx + 1) % this.size,
        );
      });
      this.freeHead = (head + bufs.length) % this.size;
    }
    this.publish(head);
    return head;
  }

  /** used.idx. */
  usedIdx(): number {
    return this.ram.mem.u16(this.usedAddr + 2);
  }

  /** New used entries since the last call: [id, len][]. */
  takeUsed(): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    const idx = this.usedIdx();
    while (this.lastUsed !== idx) {
      const dv = this.ram.dv(this.usedAddr + 4 + 8 * (this.lastUsed % this.size), 8);
      out.push([dv.getUint32(0, true), dv.getUint32(4, true)]);
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }
}

/** Something with virtio-MMIO registers. */
export interface MmioRegs {
  /** A read. */
  read(offset: number, data: Uint8Array): void;
  /** A write (a promise when the device may not answer yet, as a reset draining I/O). */
  write(offset: number, data: Uint8Array): void | Promise<void>;
}

/** Drives a virtio-MMIO register file. */
export class MmioDriver {
  /** Wraps a transport. */
  constructor(readonly regs: MmioRegs) {}

  /** 32-bit register read. */
  r32(off: number): number {
    const d = new Uint8Array(4);
    this.regs.read(off, d);
    return new DataView(d.buffer).getUint32(0, true);
  }

  /**
   * 32-bit register write. Returns the device's promise when it does not answer at once:
   * a vCPU would stay in its exit until then, so a driver awaits it.
   */
  w32(off: number, v: number): void | Promise<void> {
    const d = new Uint8Array(4);
    new DataView(d.buffer).setUint32(0, v >>> 0, true);
    return this.regs.write(off, d);
  }

  /** The 64-bit device feature set (two selector words). */
  deviceFeatures(): bigint {
    this.w32(0x014, 0);
    const lo = this.r32(0x010);
    this.w32(0x014, 1);
    const hi = this.r32(0x010);
    return (BigInt(hi) << 32n) | BigInt(lo);
  }

  /** Writes both driver feature words. */
  setDriverFeatures(f: bigint): void {
    this.w32(0x024, 0);
    this.w32(0x020, Number(f & 0xffff_ffffn));
    this.w32(0x024, 1);
    this.w32(0x020, Number(f >> 32n));
  }

  /** ACKNOWLEDGE, DRIVER, features, FEATURES_OK (modern). Returns whether FEATURES_OK stuck. */
  negotiate(features: bigint): boolean {
    this.w32(0x070, 0);
    this.w32(0x070, STATUS.ACKNOWLEDGE);
    this.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    this.setDriverFeatures(features);
    this.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
    return (this.r32(0x070) & STATUS.FEATURES_OK) !== 0;
  }

  /** Sets up queue `i` with version-2 registers. */
  setupQueue(i: number, q: DriverQueue): void {
    this.w32(0x030, i);
    this.w32(0x038, q.size);
    const set64 = (lo: number, a: number) => {
      this.w32(lo, a % 2 ** 32);
      this.w32(lo + 4, Math.floor(a / 2 ** 32));
    };
    set64(0x080, q.descAddr);
    set64(0x090, q.availAddr);
    set64(0x0a0, q.usedAddr);
    this.w32(0x044, 1);
  }

  /** Sets DRIVER_OK on top of the current status. */
  driverOk(): void {
    this.w32(0x070, this.r32(0x070) | STATUS.DRIVER_OK);
  }

  /** QueueNotify. */
  notify(i: number): void {
    this.w32(0x050, i);
  }

  /** Status register. */
  status(): number {
    return this.r32(0x070);
  }

  /** Reads and acknowledges InterruptStatus. */
  ackInterrupts(): number {
    const v = this.r32(0x060);
    this.w32(0x064, v);
    return v;
  }
}

/** An interrupt line that counts. */
export class CountingIrq {
  /** Times raised. */
  count = 0;
  /** Raises. */
  trigger(): void {
    this.count++;
  }
}

/** Feature bits used by tests. */
export const F = {
  INDIRECT: 1n << 28n,
  EVENT_IDX: 1n << 29n,
  VERSION_1: 1n << 32n,
} as const;
