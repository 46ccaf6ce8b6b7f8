/**
 * A driver-side harness for virtio-PCI in plain memory: config space access through the
 * bus's 0xCF8/0xCFC ports, and a modern driver that finds its structures by walking the
 * capability list (as Linux's virtio_pci_modern does) and sets a device up through the
 * common configuration in the BAR.
 */

import type { PciBus } from "../../devices/pci/bus.ts";
import type { MsiRouter, MsixVector } from "../../devices/pci/msix.ts";
import type { VirtioPci } from "../../transports/pci.ts";
import { STATUS } from "../../devices/virtio/device.ts";
import type { DriverQueue } from "./virtio_driver.ts";

/** Config space through ports 0xCF8/0xCFC of `bus`, device `slot`. */
export class PortConfig {
  /** Reaches device `slot` of `bus`. */
  constructor(readonly bus: PciBus, readonly slot: number) {}

  private select(offset: number): void {
    const a = new Uint8Array(4);
    new DataView(a.buffer).setUint32(0, (0x8000_0000 | (this.slot << 11) | (offset & 0xfc)) >>> 0, true);
    this.bus.ports.write(0, a);
  }

  /** Reads `size` bytes at `offset` (through the data port at 0xCFC + offset % 4). */
  read(offset: number, size: 1 | 2 | 4): number {
    this.select(offset);
    const d = new Uint8Array(size);
    this.bus.ports.read(4 + (offset & 3), d);
    return d.reduce((v, b, i) => v + b * 2 ** (8 * i), 0);
  }

  /** Writes `size` bytes at `offset`. */
  write(offset: number, size: 1 | 2 | 4, v: number): void {
    this.select(offset);
    const d = new Uint8Array(size);
    for (let i = 0; i < size; i++) d[i] = Math.floor(v / 2 ** (8 * i)) & 0xff;
    this.bus.ports.write(4 + (offset & 3), d);
  }

  /** The capability list as [id, offset] pairs, following next pointers (at most 48). */
  capabilities(): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    if (!(this.read(0x06, 2) & 0x10)) return out;
    let p = this.read(0x34, 1) & 0xfc;
    while (p && out.length < 48) {
      out.push([this.read(p, 1), p]);
      p = this.read(p + 1, 1) & 0xfc;
    }
    return out;
  }
}

/** An MSI router that records what it was told. */
export class RecordingRouter implements MsiRouter {
  /** The last table the transport reported. */
  table: readonly MsixVector[] = [];
  /** Vectors signalled, in order. */
  readonly signals: number[] = [];
  /** Route updates seen. */
  updates = 0;
  /** MsiRouter. */
  update(vectors: readonly MsixVector[]): void {
    this.table = vectors;
    this.updates++;
  }
  /** MsiRouter. */
  signal(index: number): void {
    this.signals.push(index);
  }
}

/** Where a modern device's structures are, from its vendor capabilities. */
export interface ModernLayout {
  /** Offsets in BAR 0. */
  common: number;
  /** Notify base. */
  notify: number;
  /** notify_off_multiplier. */
  multiplier: number;
  /** ISR. */
  isr: number;
  /** Device config. */
  device: number;
  /** Config-space offset of the PCI_CFG capability. */
  pciCfg: number;
  /** Config-space offset of the MSI-X capability. */
  msix: number;
}

/** A modern virtio-PCI driver over a transport (BAR accesses go straight to it). */
export class ModernDriver {
  /** The layout found by walking the capabilities. */
  readonly layout: ModernLayout;

  /** Binds to `t`, reachable as `cfg`. */
  constructor(readonly t: VirtioPci, readonly cfg: PortConfig) {
    const l: Partial<ModernLayout> = {};
    for (const [id, at] of cfg.capabilities()) {
      if (id === 0x11) l.msix = at;
      if (id !== 0x09) continue;
      const type = cfg.read(at + 3, 1), off = cfg.read(at + 8, 4);
      if (type === 1) l.common = off;
      if (type === 2) {
        l.notify = off;
        l.multiplier = cfg.read(at + 16, 4);
      }
      if (type === 3) l.isr = off;
      if (type === 4) l.device = off;
      if (type === 5) l.pciCfg = at;
    }
    this.layout = l as ModernLayout;
  }

  /** A BAR read of `size` bytes. */
  r(off: number, size: number): number {
    const d = new Uint8Array(size);
    this.t.barRead(off, d);
    return d.reduce((v, b, i) => v + b * 2 ** (8 * i), 0);
  }

  /** A BAR write (returns the transport's promise while a reset waits). */
  w(off: number, size: number, v: number): void | Promise<void> {
    const d = new Uint8Array(size);
    for (let i = 0; i < size; i++) d[i] = Math.floor(v / 2 ** (8 * i)) & 0xff;
    return this.t.barWrite(off, d);
  }

  /** Common config read. */
  c(off: number, size: number): number {
    return this.r(this.layout.common + off, size);
  }

  /** Common config write. */
  cw(off: number, size: number, v: number): void | Promise<void> {
    return this.w(this.layout.common + off, size, v);
  }

  /** Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; whether FEATURES_OK stuck. */
  negotiate(features: bigint): boolean {
    void this.cw(0x14, 1, 0);
    void this.cw(0x14, 1, STATUS.ACKNOWLEDGE);
    void this.cw(0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    for (const sel of [0, 1]) {
      this.cw(0x08, 4, sel);
      this.cw(0x0c, 4, Number((features >> BigInt(32 * sel)) & 0xffff_ffffn));
    }
    void this.cw(0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
    return (this.c(0x14, 1) & STATUS.FEATURES_OK) !== 0;
  }

  /** Sets up queue `i` on `q`, with MSI-X vector `vector` (0xffff: none). */
  setupQueue(i: number, q: DriverQueue, vector = 0xffff): void {
    this.cw(0x16, 2, i);
    this.cw(0x18, 2, q.size);
    this.cw(0x1a, 2, vector);
    for (const [off, a] of [[0x20, q.descAddr], [0x28, q.availAddr], [0x30, q.usedAddr]]) {
      this.cw(off, 4, a % 2 ** 32);
      this.cw(off + 4, 4, Math.floor(a / 2 ** 32));
    }
    this.cw(0x1c, 2, 1);
  }

  /** DRIVER_OK on top of the current status. */
  driverOk(): void {
    void this.cw(0x14, 1, this.c(0x14, 1) | STATUS.DRIVER_OK);
  }

  /** Rings queue `i`'s doorbell. */
  notify(i: number): void {
    const off = this.c(0x1e, 2);
    void this.w(this.layout.notify + off * this.layout.multiplier, 2, i);
  }

  /** Enables MSI-X (message control bit 15), optionally with the function mask. */
  enableMsix(functionMask = false): void {
    const mc = this.cfg.read(this.layout.msix + 2, 2);
    this.cfg.write(this.layout.msix + 2, 2, (mc & 0x3fff) | 0x8000 | (functionMask ? 0x4000 : 0));
  }

  /** Programs MSI-X table entry `i` and sets its mask bit. */
  msixEntry(i: number, address: number, data: number, masked: boolean): void {
    const table = this.cfg.read(this.layout.msix + 4, 4) & ~7;
    const at = table + 16 * i;
    void this.w(at, 4, address);
    void this.w(at + 4, 4, 0);
    void this.w(at + 8, 4, data);
    void this.w(at + 12, 4, masked ? 1 : 0);
  }
}
