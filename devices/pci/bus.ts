/**
 * PCI bus 0: functions by device number, a host bridge at 00:00.0, and the two ways
 * to reach configuration space: ports 0xCF8 (address) / 0xCFC-0xCFF (data), "mechanism
 * #1", and ECAM (one 4 KiB page per function in an MMIO window). Absent functions read
 * all ones; writes to them go nowhere.
 */

import { PciConfigSpace } from "./config_space.ts";

/** What the bus needs of a function. */
export interface PciFunction {
  /** Its configuration space. */
  readonly config: PciConfigSpace;
  /** A config read (the function may refresh live registers first). */
  readConfig?(offset: number, data: Uint8Array): void;
  /** A config write. */
  writeConfig?(offset: number, data: Uint8Array): void;
}

/** Intel's vendor ID and the host bridge ID Firecracker and Cloud Hypervisor also use. */
export const HOST_BRIDGE_IDS = { vendor: 0x8086, device: 0x0d57 } as const;
/** Devices per bus. */
export const PCI_SLOTS = 32;

/** The host bridge: class 0x0600, nothing behind it but identity. */
export class HostBridge implements PciFunction {
  /** Its configuration space. */
  readonly config: PciConfigSpace = new PciConfigSpace({
    vendor: HOST_BRIDGE_IDS.vendor,
    device: HOST_BRIDGE_IDS.device,
    revision: 0,
    classCode: 0x060000,
  });
}

/** Bus 0 with its host bridge. */
export class PciBus {
  private readonly slots: Array<PciFunction | undefined> = new Array(PCI_SLOTS).fill(undefined);
  private address = 0;

  /** A bus with the host bridge at device 0. */
  constructor() {
    this.slots[0] = new HostBridge();
  }

  /** Puts `fn` at the first free device number (function 0); returns it. */
  add(fn: PciFunction): number {
    const slot = this.slots.findIndex((s) => s === undefined);
    if (slot < 0) throw new RangeError(`PCI bus 0 is full (${PCI_SLOTS - 1} devices)`);
    this.slots[slot] = fn;
    return slot;
  }

  /** The function at device `slot`, function 0. */
  function(slot: number): PciFunction | undefined {
    return this.slots[slot];
  }

  /** Device numbers in use (the host bridge included). */
  get used(): number[] {
    return this.slots.flatMap((s, i) => (s ? [i] : []));
  }

  /** A config read of bus 0 / `dev` / `fn` at `offset`. */
  readConfig(bus: number, dev: number, fn: number, offset: number, data: Uint8Array): void {
    const f = bus === 0 && fn === 0 ? this.slots[dev] : undefined;
    if (!f) {
      data.fill(0xff);
      return;
    }
    if (f.readConfig) f.readConfig(offset, data);
    else f.config.read(offset, data);
  }

  /** A config write. */
  writeConfig(bus: number, dev: number, fn: number, offset: number, data: Uint8Array): void {
    const f = bus === 0 && fn === 0 ? this.slots[dev] : undefined;
    if (!f) return;
    if (f.writeConfig) f.writeConfig(offset, data);
    else f.config.write(offset, data);
  }

  /** The 0xCF8-0xCFF port device (register it for 8 ports at 0xCF8). */
  readonly ports: {
    read(offset: number, data: Uint8Array): void;
    write(offset: number, data: Uint8Array): void;
  } = {
    read: (offset, data) => {
      if (offset < 4) {
        // The address register answers only dword accesses.
        if (offset === 0 && data.length === 4) {
          new DataView(data.buffer, data.byteOffset, 4).setUint32(0, this.address, true);
        } else data.fill(0xff);
        return;
      }
      const a = this.address;
      if (!(a & 0x8000_0000) || offset - 4 + data.length > 4) {
        data.fill(0xff);
        return;
      }
      this.readConfig((a >>> 16) & 0xff, (a >>> 11) & 0x1f, (a >>> 8) & 7, (a & 0xfc) + offset - 4, data);
    },
    write: (offset, data) => {
      if (offset < 4) {
        if (offset === 0 && data.length === 4) {
          this.address = new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true) & 0x80ff_fffc;
        }
        return;
      }
      const a = this.address;
      if (!(a & 0x8000_0000) || offset - 4 + data.length > 4) return;
      this.writeConfig((a >>> 16) & 0xff, (a >>> 11) & 0x1f, (a >>> 8) & 7, (a & 0xfc) + offset - 4, data);
    },
  };

  /** The ECAM window device (register it over the window; one bus = 1 MiB). */
  readonly ecam: {
    read(offset: number, data: Uint8Array): void;
    write(offset: number, data: Uint8Array): void;
  } = {
    read: (offset, data) => {
      const reg = offset & 0xfff;
      if (reg + data.length > 0x1000) {
        data.fill(0xff);
        return;
      }
      this.readConfig(offset >>> 20, (offset >>> 15) & 0x1f, (offset >>> 12) & 7, reg, data);
    },
    write: (offset, data) => {
      const reg = offset & 0xfff;
      if (reg + data.length > 0x1000) return;
      this.writeConfig(offset >>> 20, (offset >>> 15) & 0x1f, (offset >>> 12) & 7, reg, data);
    },
  };
}
