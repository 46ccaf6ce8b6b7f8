/**
 * Guest physical memory: a set of regions, each a byte view over host memory.
 * Every access is bounds-checked against the regions; no raw pointer leaves here.
 */

/** One contiguous range of guest RAM. */
export interface MemoryRegion {
  /** Guest physical address of the first byte. */
  readonly gpa: number;
  /** The region's bytes (host memory). */
  readonly bytes: Uint8Array;
}

/** Guest RAM with bounds-checked access by guest physical address. */
export class GuestMemory {
  /** Regions, sorted by address, not overlapping. */
  readonly regions: readonly MemoryRegion[];

  /** Builds guest memory from regions (plain ArrayBuffers work, for tests). */
  constructor(regions: MemoryRegion[]) {
    const sorted = [...regions].sort((a, b) => a.gpa - b.gpa);
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1];
      if (prev.gpa + prev.bytes.length > sorted[i].gpa) {
        throw new RangeError(`memory regions overlap at 0x${sorted[i].gpa.toString(16)}`);
      }
    }
    this.regions = sorted;
  }

  /** Total bytes of RAM. */
  get size(): number {
    return this.regions.reduce((s, r) => s + r.bytes.length, 0);
  }

  /**
   * A view of [gpa, gpa+len) if it lies wholly inside one region, else undefined.
   * Guest-supplied addresses go through here.
   */
  tryView(gpa: number, len: number): Uint8Array | undefined {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(len) || gpa < 0 || len < 0) {
      return undefined;
    }
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa + len <= r.gpa + r.bytes.length) {
        const off = gpa - r.gpa;
        return r.bytes.subarray(off, off + len);
      }
    }
    return undefined;
  }

  /** Like tryView, but a range outside RAM throws (for VMM-chosen addresses). */
  view(gpa: number, len: number): Uint8Array {
    const v = this.tryView(gpa, len);
    if (!v) {
      throw new RangeError(
        `guest range 0x${gpa.toString(16)}+0x${len.toString(16)} is outside guest RAM`,
      );
    }
    return v;
  }

  /** Copies `data` to guest memory at `gpa`. */
  write(gpa: number, data: Uint8Array): void {
    this.view(gpa, data.length).set(data);
  }

  /** Copies `len` bytes out of guest memory. */
  read(gpa: number, len: number): Uint8Array {
    return this.view(gpa, len).slice();
  }

  /** A DataView over a range (little-endian helpers are the caller's). */
  dataView(gpa: number, len: number): DataView {
    const v = this.view(gpa, len);
    return new DataView(v.buffer, v.byteOffset, v.byteLength);
  }
}
