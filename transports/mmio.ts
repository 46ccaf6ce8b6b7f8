/**
 * virtio-MMIO version 2 (virtio 1.2 section 4.2.2): the modern register file over the
 * shared core. Registers are 32 bits wide; config space (0x100+) takes any width.
 */

import type { GuestMemory } from "../vmm/memory.ts";
import type { VirtioDevice } from "../devices/virtio/device.ts";
import { VIRTIO_F_VERSION_1 } from "../devices/virtio/queue.ts";
import { type IrqLine, MmioCore } from "./mmio_core.ts";

/** "virt" */
export const MMIO_MAGIC = 0x74726976;
/** Our vendor ID ("TSVM" would not fit a spec'd vendor; QEMU's 0x554d4551 style). */
export const MMIO_VENDOR = 0x4d565354;
/** Size of a virtio-MMIO window. */
export const MMIO_WINDOW = 0x1000;
/** QueueNotify offset (an ioeventfd with datamatch = queue index sits here). */
export const MMIO_QUEUE_NOTIFY = 0x050;
/** Start of device config space. */
export const MMIO_CONFIG = 0x100;

/** Register offsets shared by both versions. */
export const REG = {
  magic: 0x000,
  version: 0x004,
  deviceId: 0x008,
  vendorId: 0x00c,
  deviceFeatures: 0x010,
  deviceFeaturesSel: 0x014,
  driverFeatures: 0x020,
  driverFeaturesSel: 0x024,
  queueSel: 0x030,
  queueNumMax: 0x034,
  queueNum: 0x038,
  queueReady: 0x044,
  queueNotify: 0x050,
  interruptStatus: 0x060,
  interruptAck: 0x064,
  status: 0x070,
  queueDescLow: 0x080,
  queueDescHigh: 0x084,
  queueDriverLow: 0x090,
  queueDriverHigh: 0x094,
  queueDeviceLow: 0x0a0,
  queueDeviceHigh: 0x0a4,
  configGeneration: 0x0fc,
} as const;

/** Reads/writes a 32-bit little-endian register value from an access buffer. */
export function u32Of(data: Uint8Array): number {
  return (data[0] | (data[1] << 8) | (data[2] << 16) | (data[3] << 24)) >>> 0;
}

/** Fills a read buffer with a 32-bit value. */
export function putU32(data: Uint8Array, v: number): void {
  for (let i = 0; i < data.length; i++) data[i] = i < 4 ? (v >>> (8 * i)) & 0xff : 0;
}

function setHalf(old: number, v: number, high: boolean): number {
  return high ? (old % 2 ** 32) + v * 2 ** 32 : Math.floor(old / 2 ** 32) * 2 ** 32 + v;
}

/** A virtio device behind a version-2 MMIO window. */
export class VirtioMmio {
  /** The shared state. */
  readonly core: MmioCore;

  /** Puts `device` behind a modern MMIO window. */
  constructor(device: VirtioDevice, memory: GuestMemory, irq: IrqLine) {
    this.core = new MmioCore(device, memory, irq, device.features | (1n << VIRTIO_F_VERSION_1), true);
  }

  /** A guest read. */
  read(offset: number, data: Uint8Array): void {
    const c = this.core;
    if (offset >= MMIO_CONFIG) {
      c.device.readConfig(offset - MMIO_CONFIG, data);
      return;
    }
    if (data.length !== 4) {
      data.fill(0);
      return;
    }
    const q = c.queue;
    let v = 0;
    switch (offset) {
      case REG.magic:
        v = MMIO_MAGIC;
        break;
      case REG.version:
        v = 2;
        break;
      case REG.deviceId:
        v = c.device.deviceType;
        break;
      case REG.vendorId:
        v = MMIO_VENDOR;
        break;
      case REG.deviceFeatures:
        v = c.deviceFeatureWord(c.deviceFeaturesSel);
        break;
      case REG.queueNumMax:
        v = q?.maxSize ?? 0;
        break;
      case REG.queueReady:
        v = q?.ready ? 1 : 0;
        break;
      case REG.interruptStatus:
        v = c.interruptStatus;
        break;
      case REG.status:
        v = c.status;
        break;
      case REG.configGeneration:
        v = c.configGeneration;
        break;
    }
    putU32(data, v);
  }

  /** A guest write. */
  write(offset: number, data: Uint8Array): void {
    const c = this.core;
    if (offset >= MMIO_CONFIG) {
      c.device.writeConfig(offset - MMIO_CONFIG, data);
      return;
    }
    if (data.length !== 4) return;
    const v = u32Of(data);
    const q = c.queue;
    const qw = q && c.queueWritable && !q.ready;
    switch (offset) {
      case REG.deviceFeaturesSel:
        c.deviceFeaturesSel = v;
        break;
      case REG.driverFeatures:
        c.setDriverFeatureWord(c.driverFeaturesSel, v);
        break;
      case REG.driverFeaturesSel:
        c.driverFeaturesSel = v;
        break;
      case REG.queueSel:
        c.queueSel = v;
        break;
      case REG.queueNum:
        if (qw) q.size = v;
        break;
      case REG.queueReady:
        if (q && c.queueWritable) q.ready = (v & 1) === 1;
        break;
      case REG.queueNotify:
        c.notify(v & 0xffff);
        break;
      case REG.interruptAck:
        c.ack(v);
        break;
      case REG.status:
        c.writeStatus(v);
        break;
      case REG.queueDescLow:
      case REG.queueDescHigh:
        if (qw) q.descAddr = setHalf(q.descAddr, v, offset === REG.queueDescHigh);
        break;
      case REG.queueDriverLow:
      case REG.queueDriverHigh:
        if (qw) q.availAddr = setHalf(q.availAddr, v, offset === REG.queueDriverHigh);
        break;
      case REG.queueDeviceLow:
      case REG.queueDeviceHigh:
        if (qw) q.usedAddr = setHalf(q.usedAddr, v, offset === REG.queueDeviceHigh);
        break;
    }
  }
}
