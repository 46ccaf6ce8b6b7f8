/**
 * A PCI function's configuration space (PCI Local Bus 3.0 chapter 6), type 0 header:
 * bytes with per-byte writable and write-1-to-clear masks, BARs with sizing by all-ones
 * writes, and a capability chain. Pure data: whoever owns the function listens for BAR
 * and command changes (to move the device's address ranges) and handles the behaviour of
 * its capabilities through hooks.
 */

/** Offsets in the type 0 header. */
export const CFG = {
  vendorId: 0x00,
  deviceId: 0x02,
  command: 0x04,
  status: 0x06,
  revision: 0x08,
  classCode: 0x09,
  cacheLineSize: 0x0c,
  headerType: 0x0e,
  bar0: 0x10,
  subsystemVendorId: 0x2c,
  subsystemId: 0x2e,
  capabilitiesPointer: 0x34,
  interruptLine: 0x3c,
  interruptPin: 0x3d,
} as const;

/** Command register bits. */
export const CMD = { IO: 1, MEMORY: 2, BUS_MASTER: 4, INTX_DISABLE: 0x400 } as const;
/** Status register: a capability list is present. */
export const STATUS_CAP_LIST = 0x10;
/** Size of the conventional configuration space (ECAM reads beyond it read 0). */
export const CONFIG_SIZE = 256;

/** The kinds of BAR. */
export type BarKind = "mem32" | "mem64" | "io";

/** A BAR as its owner declares it. */
export interface BarDef {
  /** BAR number (0-5; a 64-bit BAR also takes the next). */
  index: number;
  /** Memory (32/64-bit) or I/O. */
  kind: BarKind;
  /** Size in bytes, a power of two (>= 16 for memory, >= 4 for I/O). */
  size: number;
  /** Prefetchable (memory BARs). */
  prefetchable?: boolean;
}

/** A declared BAR and where it is now. */
export interface Bar extends BarDef {
  /** Address bits 0-31 as programmed. */
  lo: number;
  /** Address bits 32-63 as programmed (0 for 32-bit and I/O BARs). */
  hi: number;
  /** The address (hi:lo; above 2^53 it is only approximate, and never a valid placement). */
  readonly address: number;
}

/** Identity of a function. */
export interface PciIds {
  /** Vendor ID. */
  vendor: number;
  /** Device ID. */
  device: number;
  /** Revision ID. */
  revision: number;
  /** Class code: base class << 16 | subclass << 8 | programming interface. */
  classCode: number;
  /** Subsystem vendor ID. */
  subsystemVendor?: number;
  /** Subsystem ID. */
  subsystemId?: number;
  /** Interrupt pin: 1 = INTA (0 = none). */
  interruptPin?: number;
}

/** Behaviour behind a range of configuration space (a capability's live registers). */
export interface ConfigHook {
  /** First offset. */
  start: number;
  /** One past the last offset. */
  end: number;
  /** Called after the stored bytes were updated by a write touching the range. */
  afterWrite?(offset: number, data: Uint8Array): void;
  /** Called before a read touching the range (to refresh the stored bytes). */
  beforeRead?(offset: number, length: number): void;
}

/** Type 0 configuration space of one function. */
export class PciConfigSpace {
  /** The stored bytes. */
  readonly bytes: Uint8Array = new Uint8Array(CONFIG_SIZE);
  private readonly wmask = new Uint8Array(CONFIG_SIZE);
  private readonly w1c = new Uint8Array(CONFIG_SIZE);
  private readonly dv = new DataView(this.bytes.buffer);
  /** BARs by index (the upper half of a 64-bit BAR is not listed). */
  readonly bars: Bar[] = [];
  private readonly hooks: ConfigHook[] = [];
  private nextCap = 0x40;
  private lastCap = -1;
  /** A BAR's address changed (by the guest): the owner moves what it decodes. */
  onBarChange: ((bar: Bar) => void) | undefined;
  /** The command register changed (decode enables, INTx disable). */
  onCommandChange: ((command: number) => void) | undefined;

  /** A header with `ids`; command, cache line size and interrupt line are writable. */
  constructor(ids: PciIds) {
    const dv = this.dv;
    dv.setUint16(CFG.vendorId, ids.vendor, true);
    dv.setUint16(CFG.deviceId, ids.device, true);
    this.bytes[CFG.revision] = ids.revision;
    this.bytes[CFG.classCode] = ids.classCode & 0xff;
    this.bytes[CFG.classCode + 1] = (ids.classCode >> 8) & 0xff;
    this.bytes[CFG.classCode + 2] = (ids.classCode >> 16) & 0xff;
    dv.setUint16(CFG.subsystemVendorId, ids.subsystemVendor ?? 0, true);
    dv.setUint16(CFG.subsystemId, ids.subsystemId ?? 0, true);
    this.bytes[CFG.interruptPin] = ids.interruptPin ?? 0;
    const cmd = CMD.IO | CMD.MEMORY | CMD.BUS_MASTER | CMD.INTX_DISABLE;
    this.wmask[CFG.command] = cmd & 0xff;
    this.wmask[CFG.command + 1] = cmd >> 8;
    this.wmask[CFG.cacheLineSize] = 0xff;
    this.wmask[CFG.interruptLine] = 0xff;
    // Status: the error bits are write-1-to-clear (none of them is ever set here).
    this.w1c[CFG.status + 1] = 0xf9;
  }

  /** 16-bit little-endian value at `offset`. */
  u16(offset: number): number {
    return this.dv.getUint16(offset, true);
  }

  /** 32-bit little-endian value at `offset`. */
  u32(offset: number): number {
    return this.dv.getUint32(offset, true);
  }

  /** The command register. */
  get command(): number {
    return this.u16(CFG.command);
  }

  /** Sets the command register (the VMM enabling decode before the guest runs). */
  setCommand(v: number): void {
    this.dv.setUint16(CFG.command, v, true);
  }

  /** Declares a BAR at `address` (which the VMM assigned). */
  addBar(def: BarDef, address: number): Bar {
    if (def.size & (def.size - 1) || def.size < (def.kind === "io" ? 4 : 16)) {
      throw new RangeError(`BAR ${def.index}: size ${def.size} is not a power of two of the minimum size`);
    }
    const last = def.kind === "mem64" ? def.index + 1 : def.index;
    if (def.index < 0 || last > 5 || this.barAt(def.index) || this.barAt(last)) {
      throw new RangeError(`BAR ${def.index} is taken or out of range`);
    }
    const a = address - (address % def.size);
    const bar: Bar = {
      ...def,
      lo: a % 2 ** 32,
      hi: Math.floor(a / 2 ** 32),
      get address() {
        return this.hi * 2 ** 32 + this.lo;
      },
    };
    this.bars.push(bar);
    return bar;
  }

  /** The BAR occupying BAR register `index` (either half of a 64-bit one). */
  private barAt(index: number): Bar | undefined {
    return this.bars.find((b) => b.index === index || (b.kind === "mem64" && b.index + 1 === index));
  }

  /** The BAR whose first register is `index`. */
  bar(index: number): Bar | undefined {
    return this.bars.find((b) => b.index === index);
  }

  /** The dword a BAR register reads as. */
  private barRegister(reg: number): number {
    const b = this.barAt(reg);
    if (!b) return 0;
    if (b.kind === "io") return ((b.lo & 0xffff_fffc) | 1) >>> 0;
    if (b.kind === "mem64" && reg === b.index + 1) return b.hi >>> 0;
    const flags = (b.kind === "mem64" ? 0x4 : 0) | (b.prefetchable ? 0x8 : 0);
    return ((b.lo & 0xffff_fff0) | flags) >>> 0;
  }

  /** A guest write of a whole BAR register: only the address bits the size allows stick. */
  private writeBarRegister(reg: number, v: number): void {
    const b = this.barAt(reg);
    if (!b) return;
    const [oldLo, oldHi] = [b.lo, b.hi];
    if (b.kind === "mem64" && reg === b.index + 1) {
      b.hi = v >>> 0;
    } else {
      const mask = (~(b.size - 1) & (b.kind === "io" ? 0xffff_fffc : 0xffff_fff0)) >>> 0;
      b.lo = (v & mask) >>> 0;
    }
    if (b.lo !== oldLo || b.hi !== oldHi) this.onBarChange?.(b);
  }

  /**
   * Appends a capability: `id`, then `body` (the bytes after the ID and next pointer).
   * `writable` marks which body bytes the guest may write. Returns its offset.
   */
  addCapability(id: number, body: Uint8Array, writable?: Uint8Array): number {
    const at = this.nextCap;
    const len = 2 + body.length;
    if (at + len > CONFIG_SIZE) throw new RangeError("configuration space full");
    this.bytes[at] = id;
    this.bytes[at + 1] = 0;
    this.bytes.set(body, at + 2);
    if (writable) this.wmask.set(writable.subarray(0, body.length), at + 2);
    if (this.lastCap < 0) {
      this.bytes[CFG.capabilitiesPointer] = at;
      this.dv.setUint16(CFG.status, this.u16(CFG.status) | STATUS_CAP_LIST, true);
    } else this.bytes[this.lastCap + 1] = at;
    this.lastCap = at;
    this.nextCap = (at + len + 3) & ~3;
    return at;
  }

  /** Adds live behaviour behind [start, end). */
  addHook(hook: ConfigHook): void {
    this.hooks.push(hook);
  }

  /**
   * A read of `data.length` bytes (1, 2 or 4; any alignment) at `offset`. Offsets past the
   * conventional space read 0.
   */
  read(offset: number, data: Uint8Array): void {
    const end = offset + data.length;
    for (const h of this.hooks) if (offset < h.end && h.start < end) h.beforeRead?.(offset, data.length);
    for (let i = 0; i < data.length; i++) {
      const o = offset + i;
      if (o < 0 || o >= CONFIG_SIZE) {
        data[i] = 0;
      } else if (o >= CFG.bar0 && o < CFG.bar0 + 24) {
        const reg = (o - CFG.bar0) >> 2;
        data[i] = (this.barRegister(reg) >>> (8 * (o & 3))) & 0xff;
      } else data[i] = this.bytes[o];
    }
  }

  /** A write of `data` at `offset`: read-only bits keep their value, W1C bits clear on 1. */
  write(offset: number, data: Uint8Array): void {
    const oldCommand = this.command;
    const barRegs = new Map<number, number>();
    for (let i = 0; i < data.length; i++) {
      const o = offset + i;
      if (o < 0 || o >= CONFIG_SIZE) continue;
      if (o >= CFG.bar0 && o < CFG.bar0 + 24) {
        const reg = (o - CFG.bar0) >> 2;
        const cur = barRegs.get(reg) ?? this.barRegister(reg);
        const shift = 8 * (o & 3);
        barRegs.set(reg, ((cur & ~(0xff << shift)) | (data[i] << shift)) >>> 0);
        continue;
      }
      const w = this.wmask[o], c = this.w1c[o];
      this.bytes[o] = (this.bytes[o] & ~w & ~(c & data[i])) | (data[i] & w);
    }
    for (const [reg, v] of barRegs) this.writeBarRegister(reg, v);
    const end = offset + data.length;
    for (const h of this.hooks) if (offset < h.end && h.start < end) h.afterWrite?.(offset, data);
    if (this.command !== oldCommand) this.onCommandChange?.(this.command);
  }
}
