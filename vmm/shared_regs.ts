/**
 * Device registers a vCPU thread answers by itself, from shared memory, without handing
 * the exit to the device thread: virtio-MMIO's InterruptStatus (read) and InterruptACK
 * (write clears bits), and virtio-PCI's read-to-clear ISR register (modern: in a memory BAR;
 * legacy: in the I/O BAR), which a driver touches on every interrupt. Each such handoff
 * costs a cross-thread wakeup (~13 us here, 0.6-0.8 ms inside the nested runner).
 *
 * A cleared cell may carry an interrupt line that follows it (vmm/isr_line.ts): the vCPU
 * thread that clears its last bit lowers the line itself.
 *
 * The table is filled while the machine is built, before any vCPU runs. After that only an
 * entry's address changes (`move`: a PCI BAR the guest moved or stopped decoding), and the
 * cells are updated with atomics from both sides.
 *
 * Layout (Int32): [0] entry count, [1] the VM's fd (for the lines), then MAX_ENTRIES
 * entries of 4 words (address low, address high, op | space with the line's GSI + 1 from
 * bit 8, cell index), then the cells. An entry whose op is 0 is off. After them, page-aligned
 * in the host's address space, up to MAX_PAGES pages the guest may map read-only
 * (`page`): a virtio-MMIO window's registers, whose InterruptStatus is then a cell there.
 */

import { followIsr } from "./isr_line.ts";

/** A read of the address returns the cell. */
export const SHARED_READ = 1;
/** A write to the address clears the written bits in the cell (write-1-to-clear). */
export const SHARED_CLEAR = 2;
/** A one-byte read of the address returns the cell and clears it (PCI's ISR). */
export const SHARED_READ_CLEAR = 3;

/** The operations a shared register can do. */
export type SharedOp = typeof SHARED_READ | typeof SHARED_CLEAR | typeof SHARED_READ_CLEAR;

/** Op bit: the address is an I/O port, not guest physical memory. */
const SPACE_PIO = 0x80;
const OP_MASK = 0x7f;

const MAX_ENTRIES = 128;
const ENTRY_WORDS = 4;
const ENTRIES_AT = 2;
const CELLS_AT = ENTRIES_AT + MAX_ENTRIES * ENTRY_WORDS;
const MAX_CELLS = 64;
const TABLE_BYTES = (CELLS_AT + MAX_CELLS) * 4;
const MAX_PAGES = 16;
/** The size of a page `SharedRegisters.page` hands out. */
export const SHARED_PAGE_BYTES = 4096;

/** A page of a table's memory that a guest may map (a read-only KVM memory slot). */
export interface SharedPage {
  /** The table's words: the page is `words[at]` to `words[at + 1023]`. */
  readonly words: Int32Array;
  /** The index of the page's first word. */
  readonly at: number;
  /** The page's host address. */
  readonly hostAddr: bigint;
}

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
  readonly buffer: SharedArrayBuffer = new SharedArrayBuffer(
    TABLE_BYTES + (MAX_PAGES + 1) * SHARED_PAGE_BYTES,
  );
  private readonly words = new Int32Array(this.buffer);
  private cells = 0;
  private pages = 0;
  /** Each entry's op word, kept here for `move` to turn it back on. */
  private readonly ops: number[] = [];

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
   * A new page of this table's memory (zero), aligned to a page in the host's address space,
   * for a guest to map read-only. The buffer's memory never moves and lives as long as the
   * table does: keep the table while the guest may map the page.
   */
  page(): SharedPage {
    if (this.pages >= MAX_PAGES) throw new RangeError(`at most ${MAX_PAGES} shared pages`);
    const base = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(this.buffer))));
    const page = BigInt(SHARED_PAGE_BYTES);
    const first = ((base + BigInt(TABLE_BYTES) + page - 1n) / page) * page;
    const hostAddr = first + BigInt(this.pages++) * page;
    return { words: this.words, at: Number(hostAddr - base) / 4, hostAddr };
  }

  /** The cell at byte `offset` of `page` (a multiple of 4). */
  cellIn(page: SharedPage, offset: number): SharedCell {
    if (page.words !== this.words) throw new RangeError("the page belongs to another table");
    if (offset % 4 !== 0 || offset < 0 || offset >= SHARED_PAGE_BYTES) {
      throw new RangeError(`bad offset ${offset}`);
    }
    return { array: this.words, index: page.at + offset / 4 };
  }

  /**
   * Makes accesses at `addr` (guest physical, or an I/O port with `pio`) do `op` on `cell`
   * in the vCPU thread: 4-byte ones for SHARED_READ and SHARED_CLEAR, 1-byte reads for
   * SHARED_READ_CLEAR. With `lineGsi` (SHARED_CLEAR only), a clear that leaves the cell zero
   * lowers that GSI (followIsr), the cell being the line's InterruptStatus. An undefined
   * `addr` makes the entry off until `move` gives it one. Returns the entry, for `move`.
   */
  map(addr: number | undefined, op: SharedOp, cell: SharedCell, lineGsi?: number, pio = false): number {
    if (cell.array !== this.words) throw new RangeError("the cell belongs to another table");
    if (lineGsi !== undefined && (op !== SHARED_CLEAR || this.words[1] < 0)) {
      throw new RangeError("a line needs a clearing register and the table's VM fd");
    }
    const n = this.words[0];
    if (n >= MAX_ENTRIES) throw new RangeError(`at most ${MAX_ENTRIES} shared registers`);
    const e = ENTRIES_AT + n * ENTRY_WORDS;
    const word = op | (pio ? SPACE_PIO : 0) | (lineGsi === undefined ? 0 : (lineGsi + 1) << 8);
    this.words[e] = (addr ?? 0) | 0;
    this.words[e + 1] = Math.floor((addr ?? 0) / 0x1_0000_0000);
    this.words[e + 2] = addr === undefined ? 0 : word;
    this.words[e + 3] = cell.index;
    this.ops.push(word);
    this.words[0] = n + 1;
    return n;
  }

  /**
   * Moves `entry` to `addr`, or turns it off (undefined), while vCPUs may be reading the
   * table: the entry is off while its address changes, and a vCPU checks the address again
   * after it found the entry on.
   */
  move(entry: number, addr: number | undefined): void {
    const op = this.ops[entry];
    if (op === undefined) throw new RangeError(`no shared register ${entry}`);
    const e = ENTRIES_AT + entry * ENTRY_WORDS;
    const w = this.words;
    Atomics.store(w, e + 2, 0);
    if (addr === undefined) return;
    Atomics.store(w, e, addr | 0);
    Atomics.store(w, e + 1, Math.floor(addr / 0x1_0000_0000));
    Atomics.store(w, e + 2, op);
  }
}

/**
 * The vCPU side: answers an access at `addr` (an I/O port with `pio`) if the table maps it
 * (true), else leaves it for the device thread (false). `data` holds the written value or
 * receives the read one, little-endian.
 */
export function sharedAccess(
  words: Int32Array,
  addr: number,
  isWrite: boolean,
  size: number,
  data: Uint8Array,
  pio = false,
): boolean {
  if (size !== 4 && size !== 1) return false;
  const n = words[0];
  const lo = addr | 0;
  const hi = Math.floor(addr / 0x1_0000_0000);
  const space = pio ? SPACE_PIO : 0;
  for (let i = 0; i < n; i++) {
    const e = ENTRIES_AT + i * ENTRY_WORDS;
    if (words[e] !== lo || words[e + 1] !== hi) continue;
    const word = Atomics.load(words, e + 2);
    if ((word & OP_MASK) === 0 || (word & SPACE_PIO) !== space) continue;
    // Seen on: the address again, in case the entry moved between the two reads.
    if (Atomics.load(words, e) !== lo || Atomics.load(words, e + 1) !== hi) continue;
    const op = word & OP_MASK;
    const cell = words[e + 3];
    if (op === SHARED_READ && !isWrite && size === 4) {
      const v = Atomics.load(words, cell);
      data[0] = v & 0xff;
      data[1] = (v >>> 8) & 0xff;
      data[2] = (v >>> 16) & 0xff;
      data[3] = (v >>> 24) & 0xff;
      return true;
    }
    if (op === SHARED_CLEAR && isWrite && size === 4) {
      const bits = data[0] | (data[1] << 8) | (data[2] << 16) | (data[3] << 24);
      const old = Atomics.and(words, cell, ~bits);
      const gsi = (word >>> 8) - 1;
      if (gsi >= 0 && old !== 0 && (old & ~bits) === 0) followIsr(words[1], gsi, words, cell);
      return true;
    }
    if (op === SHARED_READ_CLEAR && !isWrite && size === 1) {
      data[0] = Atomics.exchange(words, cell, 0) & 0xff;
      return true;
    }
    return false;
  }
  return false;
}
