/**
 * MSI-X (PCI Local Bus 3.0 section 6.8.2): the vector table and pending-bit array a
 * function exposes in a BAR, the capability's enable and function-mask bits, and delivery
 * through an injected router. Every vector starts masked. A vector fired while masked
 * (by its own mask bit or the function mask) sets its pending bit and is delivered when
 * unmasked; Linux masks an entry around every address/data update, so this runs on every
 * interrupt-affinity change.
 */

/** Capability ID of MSI-X. */
export const CAP_ID_MSIX = 0x11;
/** Size of one table entry. */
export const MSIX_ENTRY_SIZE = 16;
/** Message control: MSI-X enable. */
export const MSIX_ENABLE = 0x8000;
/** Message control: function mask. */
export const MSIX_FUNCTION_MASK = 0x4000;

/** A vector's message and whether it may be delivered. */
export interface MsixVector {
  /** Table index. */
  index: number;
  /** Message address, low 32 bits. */
  addressLo: number;
  /** Message address, high 32 bits. */
  addressHi: number;
  /** Message data. */
  data: number;
  /** Whether delivery is blocked (vector mask, function mask, or MSI-X disabled). */
  masked: boolean;
}

/** Where MSI-X messages go (KVM MSI routes fed by irqfds in the VMM; a recorder in tests). */
export interface MsiRouter {
  /** The deliverable set changed: `vectors` is the whole table as it is now. */
  update(vectors: readonly MsixVector[]): void;
  /** Delivers vector `index` (only called while it is unmasked). */
  signal(index: number): void;
}

/** One function's MSI-X state. */
export class MsixTable {
  private readonly table: Uint32Array;
  private readonly pending: Uint8Array;
  private control = 0;

  /** `count` vectors (1-2048), all masked. */
  constructor(readonly count: number, private readonly router: MsiRouter) {
    if (count < 1 || count > 2048) throw new RangeError(`MSI-X vector count ${count}`);
    this.table = new Uint32Array(count * 4);
    for (let i = 0; i < count; i++) this.table[4 * i + 3] = 1;
    this.pending = new Uint8Array(count);
  }

  /** Bytes of the table in its BAR. */
  get tableSize(): number {
    return this.count * MSIX_ENTRY_SIZE;
  }

  /** Bytes of the pending-bit array (whole qwords). */
  get pbaSize(): number {
    return Math.ceil(this.count / 64) * 8;
  }

  /** The capability's message control word (table size - 1, enable, function mask). */
  get messageControl(): number {
    return (this.control & (MSIX_ENABLE | MSIX_FUNCTION_MASK)) | (this.count - 1);
  }

  /** Whether the driver enabled MSI-X (INTx is off then). */
  get enabled(): boolean {
    return (this.control & MSIX_ENABLE) !== 0;
  }

  /** A guest write of message control: only enable and function mask are writable. */
  setMessageControl(v: number): void {
    const next = v & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
    if (next === (this.control & (MSIX_ENABLE | MSIX_FUNCTION_MASK))) return;
    this.control = next;
    this.changed();
  }

  private masked(i: number): boolean {
    return !this.enabled || (this.control & MSIX_FUNCTION_MASK) !== 0 || (this.table[4 * i + 3] & 1) !== 0;
  }

  /** The table as the router sees it. */
  vectors(): MsixVector[] {
    return Array.from({ length: this.count }, (_, i) => ({
      index: i,
      addressLo: this.table[4 * i],
      addressHi: this.table[4 * i + 1],
      data: this.table[4 * i + 2],
      masked: this.masked(i),
    }));
  }

  /** Routes follow the table, then vectors that became deliverable get what was pending. */
  private changed(): void {
    this.router.update(this.vectors());
    for (let i = 0; i < this.count; i++) {
      if (this.pending[i] && !this.masked(i)) {
        this.pending[i] = 0;
        this.router.signal(i);
      }
    }
  }

  /** Fires vector `index`: delivered, or left pending while masked. Out-of-range is ignored. */
  fire(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.count) return;
    if (this.masked(index)) this.pending[index] = 1;
    else this.router.signal(index);
  }

  /** Whether vector `index` is pending. */
  isPending(index: number): boolean {
    return this.pending[index] === 1;
  }

  /** A guest read of the table (any width; bytes past it read 0). */
  readTable(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const o = offset + i;
      data[i] = o >= 0 && o < this.tableSize ? (this.table[o >> 2] >>> (8 * (o & 3))) & 0xff : 0;
    }
  }

  /** A guest write of the table: address, data and the mask bit of vector control. */
  writeTable(offset: number, data: Uint8Array): void {
    let touched = false;
    for (let i = 0; i < data.length; i++) {
      const o = offset + i;
      if (o < 0 || o >= this.tableSize) continue;
      const word = o >> 2, shift = 8 * (o & 3);
      let b = data[i];
      if ((word & 3) === 3) b = shift === 0 ? b & 1 : 0; // vector control: only the mask bit
      const next = ((this.table[word] & ~(0xff << shift)) | (b << shift)) >>> 0;
      if (next !== this.table[word]) {
        this.table[word] = next;
        touched = true;
      }
    }
    if (touched) this.changed();
  }

  /** A guest read of the pending-bit array. Writes to it are ignored (it is read-only). */
  readPba(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const o = offset + i;
      let byte = 0;
      for (let bit = 0; bit < 8; bit++) {
        const v = 8 * o + bit;
        if (o >= 0 && v < this.count && this.pending[v]) byte |= 1 << bit;
      }
      data[i] = o >= 0 && o < this.pbaSize ? byte : 0;
    }
  }

  /** Back to power-on: disabled, every vector masked, nothing pending. */
  reset(): void {
    this.control = 0;
    this.table.fill(0);
    for (let i = 0; i < this.count; i++) this.table[4 * i + 3] = 1;
    this.pending.fill(0);
    this.router.update(this.vectors());
  }
}
