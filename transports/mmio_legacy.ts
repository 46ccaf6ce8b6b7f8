/**
 * virtio-MMIO version 1, the legacy interface (virtio 1.2 section 4.2.4): GuestPageSize,
 * QueuePFN and QueueAlign instead of 64-bit ring addresses and QueueReady, 32 feature bits,
 * no FEATURES_OK. Same shared core as version 2.
 */

import type { GuestMemory } from "../vmm/memory.ts";
import type { SharedCell } from "../vmm/shared_regs.ts";
import type { VirtioDevice } from "../devices/virtio/device.ts";
import { MmioRegisterFile, REG } from "./mmio_core.ts";
import { type IrqLine, VirtioCore } from "./virtio_core.ts";

/** Legacy-only register offsets. */
export const LEGACY_REG = {
  guestPageSize: 0x028,
  queueAlign: 0x03c,
  queuePfn: 0x040,
} as const;

/** A virtio device behind a version-1 (legacy) MMIO window. */
export class VirtioMmioLegacy extends MmioRegisterFile {
  /** The shared state. */
  readonly core: VirtioCore;
  private pageSize = 4096;
  private readonly align: number[];
  private readonly pfn: number[];

  /** Puts `device` behind a legacy MMIO window (feature bits 0-31 only, no VERSION_1). */
  constructor(device: VirtioDevice, memory: GuestMemory, irq: IrqLine, isr?: SharedCell) {
    super();
    this.core = new VirtioCore(device, memory, irq, device.features & 0xffff_ffffn, false, isr);
    this.align = device.queueMaxSizes.map(() => 4096);
    this.pfn = device.queueMaxSizes.map(() => 0);
  }

  /** Legacy register reads. */
  protected readRegister(offset: number): number | undefined {
    const c = this.core;
    switch (offset) {
      case REG.deviceFeatures:
        return c.deviceFeaturesSel === 0 ? c.deviceFeatureWord(0) : 0;
      case LEGACY_REG.queuePfn:
        return c.queue?.ready ? this.pfn[c.queueSel] : 0;
    }
    return undefined;
  }

  /** Legacy register writes; queue fields only before DRIVER_OK. */
  protected writeRegister(offset: number, v: number): void | Promise<void> {
    const c = this.core;
    const q = c.queue;
    switch (offset) {
      case REG.driverFeatures:
        if (c.driverFeaturesSel === 0) c.setDriverFeatureWord(0, v);
        break;
      case LEGACY_REG.guestPageSize:
        // A power of two; anything else leaves the queues unusable until fixed.
        this.pageSize = v;
        break;
      case REG.queueNum:
        if (q && c.queueWritable) q.size = v;
        break;
      case LEGACY_REG.queueAlign:
        if (q && c.queueWritable) this.align[c.queueSel] = v;
        break;
      case LEGACY_REG.queuePfn:
        // A page number only before DRIVER_OK; 0 at any time takes the queue out of service.
        if (v === 0) c.disableQueue(c.queueSel);
        else if (q && c.queueWritable) this.setPfn(c.queueSel, v);
        break;
      case REG.status:
        return c.writeStatus(v);
    }
  }

  /** QueuePFN: the legacy ring layout, desc | avail | pad to QueueAlign | used. */
  private setPfn(index: number, pfn: number): void {
    const q = this.core.queues[index];
    this.pfn[index] = pfn;
    const align = this.align[index];
    const page = this.pageSize;
    if (!page || (page & (page - 1)) || !align || (align & (align - 1))) {
      this.core.needsReset("legacy queue with a bad GuestPageSize or QueueAlign");
      return;
    }
    const desc = pfn * page;
    const availEnd = desc + 16 * q.size + 6 + 2 * q.size;
    q.descAddr = desc;
    q.availAddr = desc + 16 * q.size;
    q.usedAddr = Math.ceil(availEnd / align) * align;
    q.ready = true;
  }
}
