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
    this.views = sorted.map((r) => new DataView(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength));
    this.u16s = sorted.map((r) =>
      r.bytes.byteOffset % 2 === 0
        ? new Uint16Array(r.bytes.buffer, r.bytes.byteOffset, Math.floor(r.bytes.byteLength / 2))
        : undefined
    );
    this.u32s = sorted.map((r) =>
      r.bytes.byteOffset % 4 === 0
        ? new Uint32Array(r.bytes.buffer, r.bytes.byteOffset, Math.floor(r.bytes.byteLength / 4))
        : undefined
    );
  }

  /**
   * One DataView per region, made once: the ring and descriptor accessors below read and
   * write through these, so a request's ring work allocates no view (a typed-array view
   * costs more than the load it serves, on every ring access of every request).
   */
  private readonly views: DataView[];

  /**
   * The same regions as u16 and u32 arrays (undefined for a region not so aligned). The ring
   * indices the driver and the device move under each other (avail.idx, used.idx, the event
   * indices, the flags) are read and stored through these: an element access of a typed
   * array is one load or store of its width, while V8's DataView accessors may move the
   * bytes one at a time, so the other side could see half an index (the low byte new, the
   * high byte old) and take a ring of stale entries for new ones. x86 is little-endian, as
   * virtio's rings are.
   */
  private readonly u16s: Array<Uint16Array | undefined>;
  private readonly u32s: Array<Uint32Array | undefined>;

  /**
   * The index of the region that holds [gpa, gpa+len) wholly, or -1 (also for an address
   * or length that is not a non-negative safe integer). Guest-supplied addresses go through
   * here or tryView.
   */
  regionOf(gpa: number, len: number): number {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(len) || gpa < 0 || len < 0) return -1;
    const rs = this.regions;
    for (let i = 0; i < rs.length; i++) {
      const r = rs[i];
      if (gpa >= r.gpa && gpa + len <= r.gpa + r.bytes.length) return i;
    }
    return -1;
  }

  /** Region `i`'s DataView (offsets within it are `gpa - regions[i].gpa`). */
  viewOfRegion(i: number): DataView {
    return this.views[i];
  }

  /**
   * The little-endian u16 at `gpa`, or -1 if it is not inside RAM: one 16-bit load where
   * `gpa` is 2-aligned (as every ring index is), so a concurrent store is seen whole.
   */
  u16(gpa: number): number {
    const i = this.regionOf(gpa, 2);
    if (i < 0) return -1;
    const off = gpa - this.regions[i].gpa;
    const a = this.u16s[i];
    return a !== undefined && (off & 1) === 0 ? a[off / 2] : this.views[i].getUint16(off, true);
  }

  /**
   * Stores a little-endian u16 at `gpa`; false (nothing stored) if it is not inside RAM.
   * One 16-bit store where `gpa` is 2-aligned, so the driver never reads half of it.
   */
  setU16(gpa: number, value: number): boolean {
    const i = this.regionOf(gpa, 2);
    if (i < 0) return false;
    const off = gpa - this.regions[i].gpa;
    const a = this.u16s[i];
    if (a !== undefined && (off & 1) === 0) a[off / 2] = value;
    else this.views[i].setUint16(off, value, true);
    return true;
  }

  /**
   * Stores two little-endian u32s at `gpa` (a used-ring element: id, then len); false
   * (nothing stored) if the 8 bytes are not inside RAM.
   */
  setU32Pair(gpa: number, first: number, second: number): boolean {
    const i = this.regionOf(gpa, 8);
    if (i < 0) return false;
    const off = gpa - this.regions[i].gpa;
    const a = this.u32s[i];
    if (a !== undefined && (off & 3) === 0) {
      a[off / 4] = first;
      a[off / 4 + 1] = second;
      return true;
    }
    const v = this.views[i];
    v.setUint32(off, first, true);
    v.setUint32(off + 4, second, true);
    return true;
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
    const i = this.regionOf(gpa, len);
    if (i < 0) return undefined;
    const r = this.regions[i];
    // The constructor, not subarray: a view per descriptor, and subarray took 2-3x its time
    // (a 1 MiB write is 254 of them).
    return new Uint8Array(r.bytes.buffer, r.bytes.byteOffset + gpa - r.gpa, len);
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
