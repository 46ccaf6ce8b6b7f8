/**
 * virtio-MMIO version 2 (virtio 1.2 section 4.2.2): the modern registers over the shared
 * core: 64-bit features with VERSION_1, QueueReady, 64-bit ring addresses, ConfigGeneration.
 */

import type { GuestMemory } from "../vmm/memory.ts";
import type { SharedCell } from "../vmm/shared_regs.ts";
import type { VirtioDevice } from "../devices/virtio/device.ts";
import { VIRTIO_F_VERSION_1 } from "../devices/virtio/queue.ts";
import { MmioRegisterFile, REG } from "./mmio_core.ts";
import { type IrqLine, VirtioCore } from "./virtio_core.ts";

export {
  MMIO_CONFIG,
  MMIO_MAGIC,
  MMIO_QUEUE_NOTIFY,
  MMIO_VENDOR,
  MMIO_WINDOW,
  putU32,
  REG,
  u32Of,
} from "./mmio_core.ts";

/** Shared memory region registers (version 2 only). */
export const SHM_REG = {
  sel: 0x0ac,
  lenLow: 0x0b0,
  lenHigh: 0x0b4,
  baseLow: 0x0b8,
  baseHigh: 0x0bc,
} as const;

function setHalf(old: number, v: number, high: boolean): number {
  return high ? (old % 2 ** 32) + v * 2 ** 32 : Math.floor(old / 2 ** 32) * 2 ** 32 + v;
}

/** A virtio device behind a version-2 MMIO window. */
export class VirtioMmio extends MmioRegisterFile {
  /** The shared state. */
  readonly core: VirtioCore;

  /** Puts `device` behind a modern MMIO window. */
  constructor(device: VirtioDevice, memory: GuestMemory, irq: IrqLine, isr?: SharedCell) {
    super();
    this.core = new VirtioCore(device, memory, irq, device.features | (1n << VIRTIO_F_VERSION_1), true, isr);
  }

  /** Version-2 register reads. */
  protected readRegister(offset: number): number | undefined {
    const c = this.core;
    switch (offset) {
      case REG.deviceFeatures:
        return c.deviceFeatureWord(c.deviceFeaturesSel);
      case REG.queueReady:
        return c.queue?.ready ? 1 : 0;
      case REG.configGeneration:
        return c.configGeneration;
      case SHM_REG.lenLow:
      case SHM_REG.lenHigh:
      case SHM_REG.baseLow:
      case SHM_REG.baseHigh:
        // No shared memory regions: every SHMSel names a missing one, whose length is -1
        // and whose base is all ones (virtio 1.2 section 4.2.2).
        return 0xffff_ffff;
    }
    return undefined;
  }

  /** Version-2 register writes; queue fields only before DRIVER_OK and while the queue is not ready. */
  protected writeRegister(offset: number, v: number): void | Promise<void> {
    const c = this.core;
    const q = c.queue;
    const qw = q && c.queueWritable && !q.ready;
    switch (offset) {
      case REG.driverFeatures:
        c.setDriverFeatureWord(c.driverFeaturesSel, v);
        break;
      case REG.queueNum:
        if (qw) q.size = v;
        break;
      case REG.queueReady:
        // 1 only before DRIVER_OK; 0 at any time takes the queue out of service.
        if ((v & 1) === 0) c.disableQueue(c.queueSel);
        else if (q && c.queueWritable) q.ready = true;
        break;
      case REG.status:
        return c.writeStatus(v);
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
