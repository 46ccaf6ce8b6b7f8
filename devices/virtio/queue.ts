/**
 * The split virtqueue (virtio 1.2 section 2.7): the driver's available ring, the
 * device's used ring, event-index suppression both ways. Guest values are checked
 * here (ring addresses inside RAM, avail index jumps, head indexes) and every
 * violation surfaces as a QueueError so the device can ask for a reset.
 */

import type { GuestMemory } from "../../vmm/memory.ts";
import { ChainError, type DescChain, walkChain } from "./chain.ts";

/** VIRTIO_F_INDIRECT_DESC. */
export const VIRTIO_F_INDIRECT_DESC = 28n;
/** VIRTIO_F_EVENT_IDX (VIRTIO_RING_F_EVENT_IDX). */
export const VIRTIO_F_EVENT_IDX = 29n;
/** VIRTIO_F_VERSION_1. */
export const VIRTIO_F_VERSION_1 = 32n;

const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;

// A full memory barrier: an atomic read-modify-write on shared memory is a locked
// instruction on x86, which orders our earlier stores before our later loads. The ring
// protocol needs it where the device stores an index and then reads the driver's
// (virtio 1.2 section 2.7.7.2 and 2.7.10.1): without it a notification can be lost.
const fenceCell = new Int32Array(new SharedArrayBuffer(4));
function memoryBarrier(): void {
  Atomics.add(fenceCell, 0, 0);
}

/** A broken ring: the device must report DEVICE_NEEDS_RESET. */
export class QueueError extends ChainError {}

/** One split virtqueue's state, as the transport configures it and the device uses it. */
export class SplitQueue {
  /** Queue size the driver chose (power of two, <= maxSize). */
  size: number;
  /** Driver has set QueueReady (or a legacy PFN). */
  ready = false;
  /** Descriptor table address. */
  descAddr = 0;
  /** Available (driver) ring address. */
  availAddr = 0;
  /** Used (device) ring address. */
  usedAddr = 0;
  /** Next available ring slot the device will read. */
  nextAvail = 0;
  /** Next used ring slot the device will write. */
  nextUsed = 0;
  /** Indirect descriptors negotiated. */
  indirect = false;
  /** Event index negotiated. */
  eventIdx = false;
  private lastSignalledUsed = 0;

  /** A queue the device offers with at most `maxSize` entries. */
  constructor(readonly maxSize: number) {
    this.size = maxSize;
  }

  /** Back to the reset state. */
  reset(): void {
    this.size = this.maxSize;
    this.ready = false;
    this.descAddr = this.availAddr = this.usedAddr = 0;
    this.nextAvail = this.nextUsed = this.lastSignalledUsed = 0;
    this.indirect = this.eventIdx = false;
  }

  /** Why this queue cannot be used, or undefined if its size and rings are valid. */
  validate(mem: GuestMemory): string | undefined {
    const n = this.size;
    if (n === 0 || n > this.maxSize || (n & (n - 1)) !== 0) {
      return `queue size ${n} is invalid (max ${this.maxSize})`;
    }
    if (this.descAddr % 16 || this.availAddr % 2 || this.usedAddr % 4) return "queue rings are misaligned";
    if (!mem.tryView(this.descAddr, 16 * n)) return "descriptor table is outside guest RAM";
    if (!mem.tryView(this.availAddr, 6 + 2 * n)) return "available ring is outside guest RAM";
    if (!mem.tryView(this.usedAddr, 6 + 8 * n)) return "used ring is outside guest RAM";
    return undefined;
  }

  private u16(mem: GuestMemory, addr: number): number {
    const v = mem.u16(addr);
    if (v < 0) throw new QueueError(`ring address 0x${addr.toString(16)} is outside guest RAM`);
    return v;
  }

  private setU16(mem: GuestMemory, addr: number, val: number): void {
    if (!mem.setU16(addr, val & 0xffff)) {
      throw new QueueError(`ring address 0x${addr.toString(16)} is outside guest RAM`);
    }
  }

  /** Entries the driver has made available and the device has not taken. */
  pending(mem: GuestMemory): number {
    const idx = this.u16(mem, this.availAddr + 2);
    const n = (idx - this.nextAvail) & 0xffff;
    if (n > this.size) {
      throw new QueueError(`avail index moved by ${n}, more than the queue size ${this.size}`);
    }
    return n;
  }

  /** Takes the next available chain, or undefined if none. Throws QueueError/ChainError. */
  pop(mem: GuestMemory): DescChain | undefined {
    if (this.pending(mem) === 0) return undefined;
    const head = this.u16(mem, this.availAddr + 4 + 2 * (this.nextAvail % this.size));
    const chain = walkChain(mem, this.descAddr, this.size, head, this.indirect);
    this.nextAvail = (this.nextAvail + 1) & 0xffff;
    return chain;
  }

  /** Gives the last chain taken back: the next `pop` returns it again. */
  unpop(): void {
    this.nextAvail = (this.nextAvail - 1) & 0xffff;
  }

  /**
   * Tells the driver where to notify next (event index: avail_event = nextAvail), then
   * reports whether more work arrived meanwhile.
   */
  enableNotification(mem: GuestMemory): boolean {
    if (this.eventIdx) this.setU16(mem, this.usedAddr + 4 + 8 * this.size, this.nextAvail);
    memoryBarrier();
    return this.pending(mem) > 0;
  }

  /** Puts a finished chain in the used ring. */
  pushUsed(mem: GuestMemory, head: number, len: number): void {
    const slot = this.usedAddr + 4 + 8 * (this.nextUsed % this.size);
    if (!mem.setU32Pair(slot, head, len >>> 0)) throw new QueueError("used ring is outside guest RAM");
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
    // The ring entry must be visible before the index: JS stores to shared memory are
    // in program order on x86 (TSO), which the spec's write barrier needs.
    this.setU16(mem, this.usedAddr + 2, this.nextUsed);
  }

  /** Whether the driver wants an interrupt for the used entries added since the last one. */
  needsInterrupt(mem: GuestMemory): boolean {
    memoryBarrier(); // our used.idx store before the driver's used_event / flags load
    const newUsed = this.nextUsed;
    const old = this.lastSignalledUsed;
    this.lastSignalledUsed = newUsed;
    if (this.eventIdx) {
      const usedEvent = this.u16(mem, this.availAddr + 4 + 2 * this.size);
      // vring_need_event (virtio 1.2 section 2.7.10.2)
      return ((newUsed - usedEvent - 1) & 0xffff) < ((newUsed - old) & 0xffff);
    }
    return (this.u16(mem, this.availAddr) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }
}
