/**
 * virtio over PCI (virtio 1.2 section 4.1) in three flavours over one core:
 *
 * - modern: vendor 0x1af4, device 0x1040 + the virtio device ID, revision 1; the
 *   capabilities point into one 64-bit memory BAR (0) holding the common configuration,
 *   the ISR, the device configuration, one doorbell per queue, and the MSI-X table and
 *   PBA; plus the VIRTIO_PCI_CAP_PCI_CFG window that reaches the BAR through config space.
 * - legacy (virtio 0.9.5, section 4.1.4.8): device ID from the transitional table
 *   (0x1000 net, 0x1001 blk, 0x1005 rng), revision 0, subsystem device = the virtio ID;
 *   the register block in I/O BAR 0 (pci_legacy.ts), the MSI-X table in memory BAR 1.
 * - transitional: one function with both: legacy I/O BAR 0, MSI-X in BAR 1, the modern
 *   structures in 64-bit BAR 4. Whichever interface the driver writes first decides the
 *   mode until reset; a write through the other one sets DEVICE_NEEDS_RESET and is ignored.
 *
 * Interrupts: with MSI-X enabled, used buffers on a queue fire that queue's vector and a
 * config change fires the config vector (VIRTIO_MSI_NO_VECTOR: none); otherwise the ISR is
 * set and the INTx line raised (level, cleared by reading the ISR).
 */

import type { GuestMemory } from "../vmm/memory.ts";
import type { SharedCell } from "../vmm/shared_regs.ts";
import type { VirtioDevice } from "../devices/virtio/device.ts";
import { VIRTIO_F_VERSION_1 } from "../devices/virtio/queue.ts";
import { CMD, PciConfigSpace } from "../devices/pci/config_space.ts";
import type { PciFunction } from "../devices/pci/bus.ts";
import { CAP_ID_MSIX, type MsiRouter, MsixTable } from "../devices/pci/msix.ts";
import { INT_CONFIG, INT_USED_RING, type IrqLine, leValue, putLe, VirtioCore } from "./virtio_core.ts";
import { LEGACY_BAR_SIZE, LEGACY_REG, legacyRead, legacyWrite } from "./pci_legacy.ts";

/** Which virtio-PCI interfaces a function offers. */
export type PciFlavor = "modern" | "legacy" | "transitional";

/** Device IDs of legacy and transitional functions, by virtio device ID (section 4.1.2.1). */
export const LEGACY_DEVICE_IDS: Readonly<Record<number, number>> = {
  1: 0x1000,
  2: 0x1001,
  5: 0x1002,
  3: 0x1003,
  8: 0x1004,
  4: 0x1005,
  9: 0x1009,
};

/** Memory BAR of the MSI-X table and PBA on legacy and transitional functions. */
export const MSIX_BAR = { index: 1, size: 0x2000, table: 0x0000, pba: 0x1000 } as const;
/** The modern structures' BAR on a transitional function. */
export const TRANSITIONAL_MODERN_BAR = 4;

/** One BAR as the VMM maps it: what answers there, and where its doorbells are. */
export interface PciBarHandler {
  /** BAR number. */
  index: number;
  /** Its kind. */
  kind: "mem32" | "mem64" | "io";
  /** Size. */
  size: number;
  /** A guest read at `offset` in the BAR. */
  read(offset: number, data: Uint8Array): void;
  /** A guest write (a promise while a reset waits for in-flight I/O). */
  write(offset: number, data: Uint8Array): void | Promise<void>;
  /** Doorbells: ioeventfds at BAR + offset (datamatch: the written value must equal it). */
  doorbells: Array<{ offset: number; len: number; datamatch?: number; queue: number }>;
  /** Where in the BAR the one-byte read-to-clear ISR register is, if it has one. */
  isrOffset?: number;
}

/** The virtio PCI vendor ID. */
export const VIRTIO_PCI_VENDOR = 0x1af4;
/** No MSI-X vector. */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/**
 * How used-buffer interrupts leave a function now, in `VirtioPci.plan[0]` (a device thread
 * reads it to signal without asking the thread that owns the registers): the ISR bit and
 * the INTx line; the queue's MSI-X vector (`plan[1 + q]`); or the ISR bit only (INTx
 * disabled in the command register).
 */
export const PLAN = { LINE: 0, MSIX: 1, ISR_ONLY: 2 } as const;

/** virtio PCI capability types (cfg_type). */
export const VIRTIO_PCI_CAP = { COMMON: 1, NOTIFY: 2, ISR: 3, DEVICE: 4, PCI_CFG: 5 } as const;

/** Where each structure sits in the BAR. */
export const MODERN_BAR = {
  index: 0,
  size: 0x8000,
  common: 0x0000,
  commonSize: 0x40,
  isr: 0x1000,
  device: 0x2000,
  deviceSize: 0x1000,
  notify: 0x3000,
  notifyMultiplier: 4,
  msixTable: 0x4000,
  msixPba: 0x6000,
} as const;

/** virtio_pci_common_cfg field offsets. */
export const COMMON = {
  deviceFeatureSelect: 0x00,
  deviceFeature: 0x04,
  driverFeatureSelect: 0x08,
  driverFeature: 0x0c,
  msixConfig: 0x10,
  numQueues: 0x12,
  deviceStatus: 0x14,
  configGeneration: 0x15,
  queueSelect: 0x16,
  queueSize: 0x18,
  queueMsixVector: 0x1a,
  queueEnable: 0x1c,
  queueNotifyOff: 0x1e,
  queueDesc: 0x20,
  queueDriver: 0x28,
  queueDevice: 0x30,
  queueNotifyData: 0x38,
  queueReset: 0x3a,
} as const;

/** PCI class codes for virtio devices (as QEMU reports them). */
export function virtioClassCode(deviceType: number): number {
  switch (deviceType) {
    case 1:
      return 0x020000; // network controller
    case 2:
      return 0x010000; // mass storage (SCSI)
    default:
      return 0xff0000; // unclassified
  }
}

/** How a virtio-PCI function reaches the host. */
export interface PciTransportOptions {
  /** The INTx line (level; the VMM re-raises it while the ISR is non-zero). */
  intx: IrqLine;
  /** Where MSI-X messages go. */
  msi: MsiRouter;
  /** Which interfaces (default modern). */
  flavor?: PciFlavor;
  /** The ISR's cell (default: one of its own); vCPU threads may read-and-clear it (vmm/shared_regs.ts). */
  isr?: SharedCell;
}

/** A virtio device behind a virtio-PCI function. */
export class VirtioPci implements PciFunction {
  /** Which interfaces this function offers. */
  readonly flavor: PciFlavor;
  /** Transitional functions: the interface the driver chose (until reset). */
  mode: "legacy" | "modern" | undefined;
  /** The BAR of the modern structures (modern and transitional). */
  readonly modernBar: number;
  /** The transport-neutral state. */
  readonly core: VirtioCore;
  /** Configuration space. */
  readonly config: PciConfigSpace;
  /** MSI-X state. */
  readonly msix: MsixTable;
  /** msix_config. */
  configVector = VIRTIO_MSI_NO_VECTOR;
  /**
   * Shared with a device thread: [0] how used-buffer interrupts go out (PLAN), then
   * queue_msix_vector per queue (`queueVectors` is that part).
   */
  readonly plan: Int32Array;
  /** queue_msix_vector per queue. */
  readonly queueVectors: Int32Array;
  private readonly msixCap: number;
  private pciCfgCap = 0;

  /** Puts `device` behind a virtio-PCI function of `opts.flavor` (default modern). */
  constructor(readonly device: VirtioDevice, memory: GuestMemory, readonly opts: PciTransportOptions) {
    const flavor = this.flavor = opts.flavor ?? "modern";
    this.modernBar = flavor === "transitional" ? TRANSITIONAL_MODERN_BAR : MODERN_BAR.index;
    const intx: IrqLine = {
      trigger: () => {
        if (!(this.config.command & CMD.INTX_DISABLE)) opts.intx.trigger();
      },
    };
    const legacyOnly = flavor === "legacy";
    this.core = new VirtioCore(
      device,
      memory,
      intx,
      legacyOnly ? device.features & 0xffff_ffffn : device.features | (1n << VIRTIO_F_VERSION_1),
      !legacyOnly,
      opts.isr,
    );
    const queues = device.queueMaxSizes.length;
    this.plan = new Int32Array(new SharedArrayBuffer(4 * (1 + queues)));
    this.queueVectors = this.plan.subarray(1);
    this.queueVectors.fill(VIRTIO_MSI_NO_VECTOR);
    this.core.interrupts = {
      used: (q) => this.interrupt(this.queueVectors[q] ?? VIRTIO_MSI_NO_VECTOR, INT_USED_RING),
      config: () => this.interrupt(this.configVector, INT_CONFIG),
    };
    this.core.onReset = () => {
      this.configVector = VIRTIO_MSI_NO_VECTOR;
      this.queueVectors.fill(VIRTIO_MSI_NO_VECTOR);
      if (this.flavor === "transitional") this.mode = undefined;
    };
    this.msix = new MsixTable(queues + 1, opts.msi);
    const legacyId = LEGACY_DEVICE_IDS[device.deviceType];
    if (flavor !== "modern" && legacyId === undefined) {
      throw new RangeError(`${device.name} has no legacy virtio-PCI device ID`);
    }
    this.config = new PciConfigSpace({
      vendor: VIRTIO_PCI_VENDOR,
      device: flavor === "modern" ? 0x1040 + device.deviceType : legacyId,
      revision: flavor === "modern" ? 1 : 0,
      classCode: virtioClassCode(device.deviceType),
      subsystemVendor: VIRTIO_PCI_VENDOR,
      subsystemId: flavor === "modern" ? 0x40 : device.deviceType,
      interruptPin: 1,
    });
    if (flavor !== "modern") {
      this.config.addBar({ index: 0, kind: "io", size: LEGACY_BAR_SIZE }, 0);
      this.config.addBar({ index: MSIX_BAR.index, kind: "mem32", size: MSIX_BAR.size }, 0);
    }
    if (flavor !== "legacy") {
      this.config.addBar({ index: this.modernBar, kind: "mem64", size: MODERN_BAR.size }, 0);
    }
    // MSI-X: message control (enable, function mask writable), table and PBA in a BAR.
    const mx = new Uint8Array(10);
    const mdv = new DataView(mx.buffer);
    mdv.setUint16(0, this.msix.messageControl, true);
    if (flavor === "modern") {
      mdv.setUint32(2, MODERN_BAR.msixTable | MODERN_BAR.index, true);
      mdv.setUint32(6, MODERN_BAR.msixPba | MODERN_BAR.index, true);
    } else {
      mdv.setUint32(2, MSIX_BAR.table | MSIX_BAR.index, true);
      mdv.setUint32(6, MSIX_BAR.pba | MSIX_BAR.index, true);
    }
    this.msixCap = this.config.addCapability(CAP_ID_MSIX, mx, new Uint8Array([0, 0xc0]));
    this.config.addHook({
      start: this.msixCap + 2,
      end: this.msixCap + 4,
      afterWrite: () => {
        this.msix.setMessageControl(this.config.u16(this.msixCap + 2));
        this.syncPlan();
      },
      beforeRead: () => {
        const v = this.msix.messageControl;
        this.config.bytes[this.msixCap + 2] = v & 0xff;
        this.config.bytes[this.msixCap + 3] = v >> 8;
      },
    });
    if (flavor !== "legacy") this.addModernCapabilities(queues);
    this.config.addHook({ start: 4, end: 6, afterWrite: () => this.syncPlan() }); // command
    this.syncPlan();
  }

  /** Updates plan[0] after MSI-X enable or the command register changed. */
  private syncPlan(): void {
    const mode = this.msix.enabled
      ? PLAN.MSIX
      : this.config.command & CMD.INTX_DISABLE
      ? PLAN.ISR_ONLY
      : PLAN.LINE;
    Atomics.store(this.plan, 0, mode);
  }

  private addModernCapabilities(queues: number): void {
    const vcap = (type: number, offset: number, length: number, extra: number[] = []) => {
      const b = new Uint8Array(14 + extra.length);
      const dv = new DataView(b.buffer);
      b[0] = 16 + extra.length; // cap_len
      b[1] = type;
      b[2] = this.modernBar;
      dv.setUint32(6, offset, true);
      dv.setUint32(10, length, true);
      b.set(extra, 14);
      return b;
    };
    this.config.addCapability(0x09, vcap(VIRTIO_PCI_CAP.COMMON, MODERN_BAR.common, MODERN_BAR.commonSize));
    this.config.addCapability(
      0x09,
      vcap(VIRTIO_PCI_CAP.NOTIFY, MODERN_BAR.notify, MODERN_BAR.notifyMultiplier * queues, [
        MODERN_BAR.notifyMultiplier,
        0,
        0,
        0,
      ]),
    );
    this.config.addCapability(0x09, vcap(VIRTIO_PCI_CAP.ISR, MODERN_BAR.isr, 1));
    this.config.addCapability(0x09, vcap(VIRTIO_PCI_CAP.DEVICE, MODERN_BAR.device, MODERN_BAR.deviceSize));
    // VIRTIO_PCI_CAP_PCI_CFG: bar (1 byte), offset, length and data are the driver's.
    const w = new Uint8Array(18);
    w[2] = 0xff; // bar
    w.fill(0xff, 6, 18); // offset, length, pci_cfg_data
    this.pciCfgCap = this.config.addCapability(0x09, vcap(VIRTIO_PCI_CAP.PCI_CFG, 0, 0, [0, 0, 0, 0]), w);
    const data = this.pciCfgCap + 16;
    this.config.addHook({
      start: data,
      end: data + 4,
      beforeRead: () => this.pciCfgAccess(false),
      afterWrite: () => this.pciCfgAccess(true),
    });
  }

  /** The window of VIRTIO_PCI_CAP_PCI_CFG: an access of `length` bytes at `offset` of BAR `bar`. */
  private pciCfgAccess(write: boolean): void {
    const c = this.pciCfgCap;
    const bar = this.config.bytes[c + 4];
    const offset = this.config.u32(c + 8);
    const length = this.config.u32(c + 12);
    const window = this.config.bytes.subarray(c + 16, c + 20);
    // Only 1, 2 or 4 bytes, naturally aligned, inside the BAR (virtio 1.2 section 4.1.4.9).
    if (bar !== this.modernBar || ![1, 2, 4].includes(length) || offset % length !== 0) return;
    if (offset + length > MODERN_BAR.size) return;
    const d = window.subarray(0, length);
    if (write) void this.barWrite(offset, d);
    else this.barRead(offset, d);
  }

  private interrupt(vector: number, isrBit: number): void {
    if (this.msix.enabled) {
      if (vector !== VIRTIO_MSI_NO_VECTOR) this.msix.fire(vector);
      return;
    }
    this.core.raiseIsr(isrBit);
  }

  /** Doorbell offset of queue `q` in the BAR. */
  static notifyOffset(q: number): number {
    return MODERN_BAR.notify + MODERN_BAR.notifyMultiplier * q;
  }

  /** A guest read in the BAR at `offset`. */
  barRead(offset: number, data: Uint8Array): void {
    const B = MODERN_BAR;
    if (offset >= B.common && offset < B.common + B.commonSize) this.readCommon(offset - B.common, data);
    else if (offset === B.isr && data.length === 1) data[0] = this.core.takeIsr();
    else if (offset >= B.device && offset < B.device + B.deviceSize) {
      this.device.readConfig(offset - B.device, data);
    } else if (offset >= B.msixTable && offset < B.msixPba && this.flavor === "modern") {
      this.msix.readTable(offset - B.msixTable, data);
    } else if (offset >= B.msixPba && offset < B.size && this.flavor === "modern") {
      this.msix.readPba(offset - B.msixPba, data);
    } else data.fill(0);
  }

  /** A guest write in the BAR (a promise while a Status reset waits for in-flight I/O). */
  barWrite(offset: number, data: Uint8Array): void | Promise<void> {
    const B = MODERN_BAR;
    if (offset >= B.common && offset < B.common + B.commonSize) {
      return this.writeCommon(offset - B.common, data);
    }
    if (offset >= B.device && offset < B.device + B.deviceSize) {
      this.device.writeConfig(offset - B.device, data);
    } else if (offset >= B.notify && offset < B.notify + B.notifyMultiplier * this.core.queues.length) {
      const rel = offset - B.notify;
      if (rel % B.notifyMultiplier === 0 && this.mode !== "legacy") {
        this.core.notify(rel / B.notifyMultiplier);
      }
    } else if (offset >= B.msixTable && offset < B.msixPba && this.flavor === "modern") {
      this.msix.writeTable(offset - B.msixTable, data);
    }
  }

  private get queue() {
    return this.core.queue;
  }

  private readCommon(off: number, data: Uint8Array): void {
    const c = this.core;
    const q = this.queue;
    const f = (at: number, size: number, v: number) =>
      off === at && data.length === size ? (putLe(data, v), true) : false;
    const half = (at: number, v: number) =>
      (off === at && data.length === 8 && (putLe(data, v), true)) ||
      (off === at && data.length === 4 && (putLe(data, v % 2 ** 32), true)) ||
      (off === at + 4 && data.length === 4 && (putLe(data, Math.floor(v / 2 ** 32)), true));
    const handled = f(COMMON.deviceFeatureSelect, 4, c.deviceFeaturesSel) ||
      f(COMMON.deviceFeature, 4, c.deviceFeatureWord(c.deviceFeaturesSel)) ||
      f(COMMON.driverFeatureSelect, 4, c.driverFeaturesSel) ||
      f(COMMON.driverFeature, 4, c.driverFeatureWord(c.driverFeaturesSel)) ||
      f(COMMON.msixConfig, 2, this.configVector) ||
      f(COMMON.numQueues, 2, c.queues.length) ||
      f(COMMON.deviceStatus, 1, c.status) ||
      f(COMMON.configGeneration, 1, c.configGeneration & 0xff) ||
      f(COMMON.queueSelect, 2, c.queueSel) ||
      f(COMMON.queueSize, 2, q ? q.size : 0) ||
      f(COMMON.queueMsixVector, 2, q ? this.queueVectors[c.queueSel] : VIRTIO_MSI_NO_VECTOR) ||
      f(COMMON.queueEnable, 2, q?.ready ? 1 : 0) ||
      f(COMMON.queueNotifyOff, 2, q ? c.queueSel : 0) ||
      half(COMMON.queueDesc, q?.descAddr ?? 0) ||
      half(COMMON.queueDriver, q?.availAddr ?? 0) ||
      half(COMMON.queueDevice, q?.usedAddr ?? 0) ||
      f(COMMON.queueNotifyData, 2, q ? c.queueSel : 0) ||
      f(COMMON.queueReset, 2, 0);
    if (!handled) data.fill(0);
  }

  /**
   * Transitional functions: the driver's first write through one interface picks the mode
   * until reset; a write through the other one (other than a reset) is refused with
   * DEVICE_NEEDS_RESET. Returns whether the access may proceed.
   */
  claim(kind: "legacy" | "modern", isReset: boolean): boolean {
    if (this.flavor !== "transitional" || isReset) return true;
    if (this.mode === undefined) {
      this.mode = kind;
      this.core.modern = kind === "modern";
      this.core.offered = kind === "modern"
        ? this.device.features | (1n << VIRTIO_F_VERSION_1)
        : this.device.features & 0xffff_ffffn;
      return true;
    }
    if (this.mode === kind) return true;
    this.core.needsReset(`the driver used the ${kind} interface of a device in ${this.mode} mode`);
    return false;
  }

  private bars: PciBarHandler[] | undefined;

  /** The BARs as the VMM maps them (made once: they depend only on the flavour). */
  barHandlers(): PciBarHandler[] {
    return this.bars ??= this.makeBarHandlers();
  }

  private makeBarHandlers(): PciBarHandler[] {
    const queues = this.core.queues.length;
    const out: PciBarHandler[] = [];
    if (this.flavor !== "modern") {
      out.push({
        index: 0,
        kind: "io",
        size: LEGACY_BAR_SIZE,
        read: (o, d) => legacyRead(this, o, d),
        write: (o, d) => legacyWrite(this, o, d),
        isrOffset: LEGACY_REG.isr,
        doorbells: Array.from({ length: queues }, (_, q) => ({
          offset: LEGACY_REG.queueNotify,
          len: 2,
          datamatch: q,
          queue: q,
        })),
      });
      out.push({
        index: MSIX_BAR.index,
        kind: "mem32",
        size: MSIX_BAR.size,
        read: (o, d) => o < MSIX_BAR.pba ? this.msix.readTable(o, d) : this.msix.readPba(o - MSIX_BAR.pba, d),
        write: (o, d) => {
          if (o < MSIX_BAR.pba) this.msix.writeTable(o, d);
        },
        doorbells: [],
      });
    }
    if (this.flavor !== "legacy") {
      out.push({
        index: this.modernBar,
        kind: "mem64",
        size: MODERN_BAR.size,
        read: (o, d) => this.barRead(o, d),
        write: (o, d) => this.barWrite(o, d),
        isrOffset: MODERN_BAR.isr,
        doorbells: Array.from(
          { length: queues },
          (_, q) => ({ offset: VirtioPci.notifyOffset(q), len: 2, queue: q }),
        ),
      });
    }
    return out;
  }

  private writeCommon(off: number, data: Uint8Array): void | Promise<void> {
    const c = this.core;
    const q = this.queue;
    const v = leValue(data);
    if (!this.claim("modern", off === COMMON.deviceStatus && data.length === 1 && (v & 0xff) === 0)) return;
    const is = (at: number, size: number) => off === at && data.length === size;
    // Queue fields: only before DRIVER_OK, and only while the queue is not enabled.
    const qw = q !== undefined && c.queueWritable && !q.ready;
    const setHalf = (at: number, old: number, set: (a: number) => void) => {
      if (!qw) return;
      if (is(at, 8)) set(v);
      else if (is(at, 4)) set(Math.floor(old / 2 ** 32) * 2 ** 32 + v);
      else if (is(at + 4, 4)) set(v * 2 ** 32 + (old % 2 ** 32));
    };
    if (is(COMMON.deviceFeatureSelect, 4)) c.deviceFeaturesSel = v;
    else if (is(COMMON.driverFeatureSelect, 4)) c.driverFeaturesSel = v;
    else if (is(COMMON.driverFeature, 4)) c.setDriverFeatureWord(c.driverFeaturesSel, v);
    else if (is(COMMON.msixConfig, 2)) this.configVector = this.vectorValue(v);
    else if (is(COMMON.deviceStatus, 1)) return c.writeStatus(v);
    else if (is(COMMON.queueSelect, 2)) c.queueSel = v;
    else if (is(COMMON.queueSize, 2)) {
      if (qw) q.size = v;
    } else if (is(COMMON.queueMsixVector, 2)) {
      if (q) this.queueVectors[c.queueSel] = this.vectorValue(v);
    } else if (is(COMMON.queueEnable, 2)) {
      // 1 enables (before DRIVER_OK); the driver must not write 0 (section 4.1.4.3.2).
      if (q && c.queueWritable && v === 1) q.ready = true;
    } else if (q) {
      setHalf(COMMON.queueDesc, q.descAddr, (a) => q.descAddr = a);
      setHalf(COMMON.queueDriver, q.availAddr, (a) => q.availAddr = a);
      setHalf(COMMON.queueDevice, q.usedAddr, (a) => q.usedAddr = a);
    }
  }

  /** The vector a driver's write asks for, or VIRTIO_MSI_NO_VECTOR when the device has no such vector. */
  vectorValue(v: number): number {
    return v < this.msix.count ? v : VIRTIO_MSI_NO_VECTOR;
  }

  /** Whether the ISR still holds something (the INTx line stays up). */
  get intxPending(): boolean {
    return this.core.interruptStatus !== 0 && !this.msix.enabled;
  }
}
