/** Address-range buses for port I/O and MMIO: overlap-checked registration and dispatch. */

/** A device reachable on a bus. `offset` is relative to the registered base. */
export interface BusDevice {
  /** Fills `data` (1, 2, 4 or 8 bytes) for a guest read at `offset`. */
  read(offset: number, data: Uint8Array): void;
  /**
   * Handles a guest write of `data` at `offset`. A device that may not answer yet (a
   * virtio reset waiting for in-flight I/O) returns a promise; the vCPU stays in its
   * exit until it settles.
   */
  write(offset: number, data: Uint8Array): void | Promise<void>;
}

interface Entry {
  base: number;
  len: number;
  dev: BusDevice;
  name: string;
}

/** A sorted set of non-overlapping ranges. */
export class Bus {
  private entries: Entry[] = [];
  /** Accesses that hit no device, counted for diagnostics. */
  unhandled = 0;
  /** Reads that reached a device, counted for diagnostics and tests. */
  reads = 0;

  /** The bus's name, used in errors ("pio", "mmio"). */
  constructor(readonly name: string) {}

  /** Registers `dev` on [base, base+len); throws if it overlaps another range. */
  register(base: number, len: number, dev: BusDevice, name: string): void {
    if (len <= 0) throw new RangeError(`${this.name}: empty range for ${name}`);
    for (const e of this.entries) {
      if (base < e.base + e.len && e.base < base + len) {
        throw new RangeError(
          `${this.name}: ${name} at 0x${base.toString(16)}+0x${len.toString(16)} overlaps ${e.name}`,
        );
      }
    }
    this.entries.push({ base, len, dev, name });
    this.entries.sort((a, b) => a.base - b.base);
  }

  /** Removes the range registered at `base`; returns whether there was one. */
  unregister(base: number): boolean {
    const i = this.entries.findIndex((e) => e.base === base);
    if (i < 0) return false;
    this.entries.splice(i, 1);
    return true;
  }

  private find(addr: number): Entry | undefined {
    let lo = 0, hi = this.entries.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const e = this.entries[mid];
      if (addr < e.base) hi = mid - 1;
      else if (addr >= e.base + e.len) lo = mid + 1;
      else return e;
    }
    return undefined;
  }

  /** Dispatches a read; a miss reads as all ones (no device). Returns whether a device answered. */
  read(addr: number, data: Uint8Array): boolean {
    const e = this.find(addr);
    if (!e) {
      data.fill(0xff);
      this.unhandled++;
      return false;
    }
    this.reads++;
    e.dev.read(addr - e.base, data);
    return true;
  }

  /**
   * Dispatches a write; a miss is dropped. Returns the device's promise when the write
   * may not be answered yet (see BusDevice.write).
   */
  write(addr: number, data: Uint8Array): void | Promise<void> {
    const e = this.find(addr);
    if (!e) {
      this.unhandled++;
      return;
    }
    return e.dev.write(addr - e.base, data);
  }
}
