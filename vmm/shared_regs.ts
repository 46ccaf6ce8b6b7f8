/**
 * Device registers a vCPU thread answers by itself, from shared memory, without handing
 * the exit to the device thread: today virtio-MMIO's InterruptStatus (read) and
 * InterruptACK (write clears bits), which a driver touches on every interrupt. Each such
 * handoff costs a cross-thread wakeup (~13 us here, 0.6-0.8 ms inside the nested runner).
 *
 * A cleared cell may carry an interrupt line that follows it (vmm/isr_line.ts): the vCPU
 * thread that clears its last bit lowers the line itself.
 *
 * The table is filled while the machine is built, before any vCPU runs, and is read-only
 * afterwards; the cells are updated with atomics from both sides.
 *
 * Layout (Int32): [0] entry count, [1] the VM's fd (for the lines), then MAX_ENTRIES
 * entries of 4 words (address low, address high, op with the line's GSI + 1 from bit 8,
 * cell index), then the cells.
 */

import { followIsr } from "./isr_line.ts";

/** A read of the address returns the cell. */
export const SHARED_READ = 1;
/** A write to the address clears the written bits in the cell (write-1-to-clear). */
export const SHARED_CLEAR = 2;

const MAX_ENTRIES = 64;
const ENTRY_WORDS = 4;
const ENTRIES_AT = 2;
const CELLS_AT = ENTRIES_AT + MAX_ENTRIES * ENTRY_WORDS;
const MAX_CELLS = 32;

/** One 32-bit value in shared memory. */
export interface SharedCell {
  /** The array holding it. */
  readonly array: Int32Array;
  /** Its index there. */
  readonly index: number;
}

/** A cell of its own, for a device that is not behind a vCPU (tests). */
export function privateCell(): SharedCell {
  return { array: new Int32Array(new SharedArrayBuffer(4)), index: 0 };
}

/** The table of shared registers of one VM. */
export class SharedRegisters {
  /** The memory vCPU threads are given. */
  readonly buffer: SharedArrayBuffer = new SharedArrayBuffer((CELLS_AT + MAX_CELLS) * 4);
  private readonly words = new Int32Array(this.buffer);
  private cells = 0;

  /** A table for the VM `vmFd` (the lines' KVM_IRQ_LINE goes there; -1: no lines). */
  constructor(vmFd = -1) {
    this.words[1] = vmFd;
  }

  /** A new cell (zero). */
  cell(): SharedCell {
    if (this.cells >= MAX_CELLS) throw new RangeError(`at most ${MAX_CELLS} shared register cells`);
    return { array: this.words, index: CELLS_AT + this.cells++ };
  }

  /**
   * Makes 4-byte accesses at guest physical `addr` do `op` on `cell` in the vCPU thread.
   * With `lineGsi` (SHARED_CLEAR only), a clear that leaves the cell zero lowers that GSI
   * (followIsr), the cell being the line's InterruptStatus.
   */
  map(addr: number, op: typeof SHARED_READ | typeof SHARED_CLEAR, cell: SharedCell, lineGsi?: number): void {
    if (cell.array !== this.words) throw new RangeError("the cell belongs to another table");
    if (lineGsi !== undefined && (op !== SHARED_CLEAR || this.words[1] < 0)) {
      throw new RangeError("a line needs a clearing register and the table's VM fd");
    }
    const n = this.words[0];
    if (n >= MAX_ENTRIES) throw new RangeError(`at most ${MAX_ENTRIES} shared registers`);
    const e = ENTRIES_AT + n * ENTRY_WORDS;
    this.words[e] = addr | 0;
    this.words[e + 1] = Math.floor(addr / 0x1_0000_0000);
    this.words[e + 2] = op | (lineGsi === undefined ? 0 : (lineGsi + 1) << 8);
    this.words[e + 3] = cell.index;
    this.words[0] = n + 1;
  }
}

/**
 * The vCPU side: answers a 4-byte access at `addr` if the table maps it (true), else
 * leaves it for the device thread (false). `data` holds the written value or receives
 * the read one, little-endian.
 */
export function sharedAccess(
  words: Int32Array,
  addr: number,
  isWrite: boolean,
  size: number,
  data: Uint8Array,
): boolean {
  if (size !== 4) return false;
  const n = words[0];
  const lo = addr | 0;
  const hi = Math.floor(addr / 0x1_0000_0000);
  for (let i = 0; i < n; i++) {
    const e = ENTRIES_AT + i * ENTRY_WORDS;
    if (words[e] !== lo || words[e + 1] !== hi) continue;
    const op = words[e + 2] & 0xff;
    const cell = words[e + 3];
    if (op === SHARED_READ && !isWrite) {
      const v = Atomics.load(words, cell);
      data[0] = v & 0xff;
      data[1] = (v >>> 8) & 0xff;
      data[2] = (v >>> 16) & 0xff;
      data[3] = (v >>> 24) & 0xff;
      return true;
    }
    if (op === SHARED_CLEAR && isWrite) {
      const bits = data[0] | (data[1] << 8) | (data[2] << 16) | (data[3] << 24);
      const old = Atomics.and(words, cell, ~bits);
      const gsi = (words[e + 2] >>> 8) - 1;
      if (gsi >= 0 && old !== 0 && (old & ~bits) === 0) followIsr(words[1], gsi, words, cell);
      return true;
    }
    return false;
  }
  return false;
}
