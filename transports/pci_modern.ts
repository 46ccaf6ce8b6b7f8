/**
 * virtio over PCI, the modern interface (virtio 1.2 section 4.1): a PCI function with
 * vendor 0x1af4, device 0x1040 + the virtio device ID, revision 1, whose capabilities
 * point into one 64-bit memory BAR holding the common configuration, the ISR, the device
 * configuration, one notification doorbell per queue, and the MSI-X table and PBA; plus
 * the VIRTIO_PCI_CAP_PCI_CFG window that reaches the BAR through config space.
 *
 * Interrupts: with MSI-X enabled, used buffers on a queue fire that queue's vector and a
 * config change fires msix_config (VIRTIO_MSI_NO_VECTOR: none); otherwise the ISR is set
 * and the INTx line raised (level, cleared by reading the ISR).
 */

import type { GuestMemory } from "../vmm/memory.ts";
import type { VirtioDevice } from "../devices/virtio/device.ts";
import { VIRTIO_F_VERSION_1 } from "../devices/virtio/queue.ts";
import { CMD, PciConfigSpace } from "../devices/pci/config_space.ts";
import type { PciFunction } from "../devices/pci/bus.ts";
import { CAP_ID_MSIX, type MsiRouter, MsixTable } from "../devices/pci/msix.ts";
import { INT_CONFIG, INT_USED_RING, type IrqLine, VirtioCore } from "./virtio_core.ts";

/** The virtio PCI vendor ID. */
export const VIRTIO_PCI_VENDOR = 0x1af4;
/** No MSI-X vector. */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

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
}

function le(data: Uint8Array): number {
  let v = 0;
  for (let i = data.length - 1; i >= 0; i--) v = v * 256 + data[i];
  return v;
}

function put(data: Uint8Array, v: number): void {
  for (let i = 0; i < data.length; i++) {
    data[i] = i < 6 ? Math.floor(v / 2 ** (8 * i)) & 0xff : 0;
  }
}

/** A virtio device behind a modern virtio-PCI function. */
export class VirtioPciModern implements PciFunction {
  /** The transport-neutral state. */
  readonly core: VirtioCore;
  /** Configuration space. */
  readonly config: PciConfigSpace;
  /** MSI-X state. */
  readonly msix: MsixTable;
  /** msix_config. */
  configVector = VIRTIO_MSI_NO_VECTOR;
  /** queue_msix_vector per queue. */
  readonly queueVectors: number[];
  private readonly msixCap: number;
  private readonly pciCfgCap: number;

  /** Puts `device` behind a modern virtio-PCI function. */
  constructor(readonly device: VirtioDevice, memory: GuestMemory, readonly opts: PciTransportOptions) {
    const intx: IrqLine = {
      trigger: () => {
        if (!(this.config.command & CMD.INTX_DISABLE)) opts.intx.trigger();
      },
    };
    this.core = new VirtioCore(device, memory, intx, device.features | (1n << VIRTIO_F_VERSION_1), true);
    const queues = device.queueMaxSizes.length;
    this.queueVectors = new Array(queues).fill(VIRTIO_MSI_NO_VECTOR);
    this.core.interrupts = {
      used: (q) => this.interrupt(this.queueVectors[q] ?? VIRTIO_MSI_NO_VECTOR, INT_USED_RING),
      config: () => this.interrupt(this.configVector, INT_CONFIG),
    };
    this.core.onReset = () => {
      this.configVector = VIRTIO_MSI_NO_VECTOR;
      this.queueVectors.fill(VIRTIO_MSI_NO_VECTOR);
    };
    this.msix = new MsixTable(queues + 1, opts.msi);
    this.config = new PciConfigSpace({
      vendor: VIRTIO_PCI_VENDOR,
      device: 0x1040 + device.deviceType,
      revision: 1,
      classCode: virtioClassCode(device.deviceType),
      subsystemVendor: VIRTIO_PCI_VENDOR,
      subsystemId: 0x40,
      interruptPin: 1,
    });
    this.config.addBar({ index: MODERN_BAR.index, kind: "mem64", size: MODERN_BAR.size }, 0);
    // MSI-X: message control (enable, function mask writable), table and PBA in the BAR.
    const mx = new Uint8Array(10);
    const mdv = new DataView(mx.buffer);
    mdv.setUint16(0, this.msix.messageControl, true);
    mdv.setUint32(2, MODERN_BAR.msixTable | MODERN_BAR.index, true);
    mdv.setUint32(6, MODERN_BAR.msixPba | MODERN_BAR.index, true);
    this.msixCap = this.config.addCapability(CAP_ID_MSIX, mx, new Uint8Array([0, 0xc0]));
    this.config.addHook({
      start: this.msixCap + 2,
      end: this.msixCap + 4,
      afterWrite: () => this.msix.setMessageControl(this.config.u16(this.msixCap + 2)),
      beforeRead: () => {
        const v = this.msix.messageControl;
        this.config.bytes[this.msixCap + 2] = v & 0xff;
        this.config.bytes[this.msixCap + 3] = v >> 8;
      },
    });
    const vcap = (type: number, offset: number, length: number, extra: number[] = []) => {
      const b = new Uint8Array(14 + extra.length);
      const dv = new DataView(b.buffer);
      b[0] = 16 + extra.length; // cap_len
      b[1] = type;
      b[2] = MODERN_BAR.index;
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
    if (bar !== MODERN_BAR.index || ![1, 2, 4].includes(length) || offset % length !== 0) return;
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
    } else if (offset >= B.msixTable && offset < B.msixPba) this.msix.readTable(offset - B.msixTable, data);
    else if (offset >= B.msixPba && offset < B.size) this.msix.readPba(offset - B.msixPba, data);
    else data.fill(0);
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
      if (rel % B.notifyMultiplier === 0) this.core.notify(rel / B.notifyMultiplier);
    } else if (offset >= B.msixTable && offset < B.msixPba) this.msix.writeTable(offset - B.msixTable, data);
  }

  private get queue() {
    return this.core.queue;
  }

  private readCommon(off: number, data: Uint8Array): void {
    const c = this.core;
    const q = this.queue;
    const f = (at: number, size: number, v: number) =>
      off === at && data.length === size ? (put(data, v), true) : false;
    const half = (at: number, v: number) =>
      (off === at && data.length === 8 && (put(data, v), true)) ||
      (off === at && data.length === 4 && (put(data, v % 2 ** 32), true)) ||
      (off === at + 4 && data.length === 4 && (put(data, Math.floor(v / 2 ** 32)), true));
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

  private writeCommon(off: number, data: Uint8Array): void | Promise<void> {
    const c = this.core;
    const q = this.queue;
    const v = le(data);
    const is = (at: number, size: number) => off === at && data.length === size;
    // Queue fields: only before DRIVER_OK, and only while the queue is not enabled.
    const qw = q !== undefined && c.queueWritable && !q.ready;
    const vector = (n: number) => (n < this.msix.count ? n : VIRTIO_MSI_NO_VECTOR);
    const setHalf = (at: number, old: number, set: (a: number) => void) => {
      if (!qw) return;
      if (is(at, 8)) set(v);
      else if (is(at, 4)) set(Math.floor(old / 2 ** 32) * 2 ** 32 + v);
      else if (is(at + 4, 4)) set(v * 2 ** 32 + (old % 2 ** 32));
    };
    if (is(COMMON.deviceFeatureSelect, 4)) c.deviceFeaturesSel = v;
    else if (is(COMMON.driverFeatureSelect, 4)) c.driverFeaturesSel = v;
    else if (is(COMMON.driverFeature, 4)) c.setDriverFeatureWord(c.driverFeaturesSel, v);
    else if (is(COMMON.msixConfig, 2)) this.configVector = vector(v);
    else if (is(COMMON.deviceStatus, 1)) return c.writeStatus(v);
    else if (is(COMMON.queueSelect, 2)) c.queueSel = v;
    else if (is(COMMON.queueSize, 2)) {
      if (qw) q.size = v;
    } else if (is(COMMON.queueMsixVector, 2)) {
      if (q) this.queueVectors[c.queueSel] = vector(v);
    } else if (is(COMMON.queueEnable, 2)) {
      // 1 enables (before DRIVER_OK); the driver must not write 0 (section 4.1.4.3.2).
      if (q && c.queueWritable && v === 1) q.ready = true;
    } else if (q) {
      setHalf(COMMON.queueDesc, q.descAddr, (a) => q.descAddr = a);
      setHalf(COMMON.queueDriver, q.availAddr, (a) => q.availAddr = a);
      setHalf(COMMON.queueDevice, q.usedAddr, (a) => q.usedAddr = a);
    }
  }

  /** Whether the ISR still holds something (the INTx line stays up). */
  get intxPending(): boolean {
    return this.core.interruptStatus !== 0 && !this.msix.enabled;
  }
}
