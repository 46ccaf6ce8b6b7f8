/**
 * Descriptor-chain walking for split virtqueues (virtio 1.2 section 2.7.5), with every
 * guest value checked where it enters: index < queue size, chain length <= size (no
 * loops; indirect descriptors count, and an indirect table longer than the queue is
 * refused before it is read), indirect tables only with the feature and never nested, lengths summed
 * without overflow, device-writable after device-readable, every buffer inside RAM.
 */

import type { GuestMemory } from "../../vmm/memory.ts";

/** Descriptor flags. */
export const VIRTQ_DESC_F_NEXT = 1;
/** Buffer is device-writable. */
export const VIRTQ_DESC_F_WRITE = 2;
/** Buffer holds an indirect descriptor table. */
export const VIRTQ_DESC_F_INDIRECT = 4;
/** Size of one descriptor. */
export const DESC_SIZE = 16;
/** The used length field is 32 bits; no chain may carry more. */
const MAX_CHAIN_BYTES = 0xffff_ffff;

/** A guest mistake in a descriptor chain: the device answers with NEEDS_RESET. */
export class ChainError extends Error {
  /** Builds the error. */
  constructor(message: string) {
    super(message);
    this.name = "ChainError";
  }
}

/** A walked chain: views of guest memory, readable ones first. */
export interface DescChain {
  /** Head index (goes back in the used ring). */
  head: number;
  /** Device-readable buffers, in order. */
  readable: Uint8Array[];
  /** Device-writable buffers, in order. */
  writable: Uint8Array[];
  /** Total readable bytes. */
  readableLen: number;
  /** Total writable bytes. */
  writableLen: number;
}

/**
 * Walks the chain starting at `head` of the table at `table` with `size` entries.
 * Throws ChainError on any rule broken.
 */
export function walkChain(
  mem: GuestMemory,
  table: number,
  size: number,
  head: number,
  indirectAllowed: boolean,
): DescChain {
  const chain: DescChain = { head, readable: [], writable: [], readableLen: 0, writableLen: 0 };
  let total = 0;
  let seenWritable = false;
  // Descriptors in the whole chain, direct and indirect: no more than the queue size
  // (virtio 1.2 section 2.7.5.3.1), which bounds the work one notification can cause.
  let descriptors = 0;

  if (head >= size) throw new ChainError(`head index ${head} >= queue size ${size}`);
  // One pass per table: the queue's, then (after an indirect descriptor) that table.
  let tableAddr = table;
  let count = size;
  let idx = head;
  let inIndirect = false;
  for (;;) {
    const region = mem.regionOf(tableAddr, count * DESC_SIZE);
    if (region < 0) {
      throw new ChainError(`descriptor table at 0x${tableAddr.toString(16)} is outside guest RAM`);
    }
    // The region's own view: every offset read below is inside the table just checked.
    const dv = mem.viewOfRegion(region);
    const base = tableAddr - mem.regions[region].gpa;
    for (let steps = 0;; steps++) {
      if (idx >= count) throw new ChainError(`descriptor index ${idx} >= ${count}`);
      if (steps >= count) throw new ChainError(`descriptor chain longer than ${count} (a loop)`);
      if (++descriptors > size) throw new ChainError(`descriptor chain longer than the queue size ${size}`);
      const o = base + idx * DESC_SIZE;
      // Two halves rather than a BigInt: an address of 2^53 or more is not a safe integer
      // either way, and the checks below refuse it.
      const addr = dv.getUint32(o, true) + dv.getUint32(o + 4, true) * 0x1_0000_0000;
      const len = dv.getUint32(o + 8, true);
      const flags = dv.getUint16(o + 12, true);
      const next = dv.getUint16(o + 14, true);
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (!indirectAllowed) throw new ChainError("indirect descriptor without VIRTIO_F_INDIRECT_DESC");
        if (inIndirect) throw new ChainError("nested indirect descriptor table");
        if (flags & VIRTQ_DESC_F_NEXT) throw new ChainError("indirect descriptor with NEXT set");
        if (len === 0 || len % DESC_SIZE !== 0) {
          throw new ChainError(`indirect table length ${len} is not n*16`);
        }
        if (len / DESC_SIZE > size - descriptors + 1) {
          throw new ChainError(
            `indirect table of ${
              len / DESC_SIZE
            } descriptors: the chain is longer than the queue size ${size}`,
          );
        }
        descriptors--; // the table's own descriptor is not part of the chain's buffers
        // The chain goes on in the indirect table, from its first entry, and ends there.
        tableAddr = addr;
        count = len / DESC_SIZE;
        idx = 0;
        inIndirect = true;
        break;
      }
      const buf = mem.tryView(addr, len);
      if (!buf) throw new ChainError(`buffer 0x${addr.toString(16)}+${len} is outside guest RAM`);
      total += len;
      if (total > MAX_CHAIN_BYTES) throw new ChainError("descriptor chain carries more than 4 GiB");
      if (flags & VIRTQ_DESC_F_WRITE) {
        seenWritable = true;
        chain.writable.push(buf);
        chain.writableLen += len;
      } else {
        if (seenWritable) throw new ChainError("device-readable descriptor after a device-writable one");
        chain.readable.push(buf);
        chain.readableLen += len;
      }
      if (!(flags & VIRTQ_DESC_F_NEXT)) return chain;
      idx = next;
    }
  }
}

/** Copies up to `n` bytes out of a list of buffers, starting `skip` bytes in. */
export function gather(bufs: Uint8Array[], skip: number, n: number): Uint8Array {
  const out = new Uint8Array(n);
  let at = 0;
  for (const b of bufs) {
    if (at >= n) break;
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const take = Math.min(b.length - skip, n - at);
    out.set(b.subarray(skip, skip + take), at);
    at += take;
    skip = 0;
  }
  return out.subarray(0, at);
}

/** Copies `data` into a list of buffers, starting `skip` bytes in; returns bytes written. */
export function scatter(bufs: Uint8Array[], skip: number, data: Uint8Array): number {
  let at = 0;
  for (const b of bufs) {
    if (at >= data.length) break;
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const take = Math.min(b.length - skip, data.length - at);
    b.set(data.subarray(at, at + take), skip);
    at += take;
    skip = 0;
  }
  return at;
}

/** Splits a buffer list into views covering [skip, skip+n) (no copies; whole buffers as they are). */
export function sliceBuffers(bufs: Uint8Array[], skip: number, n: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const b of bufs) {
    if (n <= 0) break;
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const take = Math.min(b.length - skip, n);
    // A whole buffer goes as it is: a new view per descriptor costs more than the rest of
    // the slicing (a 1 MiB write is 254 of them).
    out.push(skip === 0 && take === b.length ? b : b.subarray(skip, skip + take));
    n -= take;
    skip = 0;
  }
  return out;
}
