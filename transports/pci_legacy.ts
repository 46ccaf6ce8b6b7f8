/**
 * The legacy virtio-PCI register block (virtio 1.2 section 4.1.4.8, "Legacy Interfaces";
 * virtio 0.9.5), in I/O BAR 0 of legacy and transitional functions:
 *
 *   0 HOST_FEATURES (32, bits 0-31 only: no VERSION_1)   4 GUEST_FEATURES (32)
 *   8 QUEUE_PFN (32, 4 KiB page; 0 disables the queue)  12 QUEUE_NUM (16, read-only)
 *  14 QUEUE_SEL (16)   16 QUEUE_NOTIFY (16)   18 STATUS (8; 0 resets)   19 ISR (8, read-to-clear)
 *  while MSI-X is enabled: 20 CONFIG_VECTOR (16), 22 QUEUE_VECTOR (16), device config at 24;
 *  otherwise device config at 20.
 *
 * Rings use the legacy layout: descriptors at PFN * 4096, the available ring after them,
 * the used ring at the next 4096 boundary. There is no FEATURES_OK step and no config
 * generation: a multi-byte config field read in pieces can tear if the device changes it
 * in between (nothing here changes config at run time). Values are guest-native
 * little-endian, as on x86.
 */

import { STATUS } from "../devices/virtio/device.ts";
import type { VirtioPci } from "./pci.ts";
import { leValue, putLe } from "./virtio_core.ts";

/** Register offsets. */
export const LEGACY_REG = {
  hostFeatures: 0,
  guestFeatures: 4,
  queuePfn: 8,
  queueNum: 12,
  queueSel: 14,
  queueNotify: 16,
  status: 18,
  isr: 19,
  configVector: 20,
  queueVector: 22,
} as const;

/** Size of the I/O BAR: registers plus the largest device config (virtio-blk's 60 bytes). */
export const LEGACY_BAR_SIZE = 0x80;
/** The legacy ring alignment and page size. */
export const LEGACY_VRING_ALIGN = 4096;

/** Where the device config starts: it moves with the live MSI-X enable bit. */
export function legacyConfigOffset(t: VirtioPci): number {
  return t.msix.enabled ? 24 : 20;
}

/** A guest read of the legacy block. */
export function legacyRead(t: VirtioPci, off: number, data: Uint8Array): void {
  const c = t.core;
  const q = c.queue;
  const cfg = legacyConfigOffset(t);
  if (off >= cfg) {
    t.device.readConfig(off - cfg, data);
    return;
  }
  const is = (at: number, size: number) => off === at && data.length === size;
  if (is(LEGACY_REG.hostFeatures, 4)) putLe(data, Number(c.device.features & 0xffff_ffffn));
  else if (is(LEGACY_REG.guestFeatures, 4)) putLe(data, c.driverFeatureWord(0));
  else if (is(LEGACY_REG.queuePfn, 4)) {
    putLe(data, q?.ready ? Math.floor(q.descAddr / LEGACY_VRING_ALIGN) : 0);
  } else if (is(LEGACY_REG.queueNum, 2)) putLe(data, q ? q.maxSize : 0);
  else if (is(LEGACY_REG.queueSel, 2)) putLe(data, c.queueSel);
  else if (is(LEGACY_REG.status, 1)) putLe(data, c.status);
  else if (is(LEGACY_REG.isr, 1)) putLe(data, c.takeIsr());
  else if (t.msix.enabled && is(LEGACY_REG.configVector, 2)) putLe(data, t.configVector);
  else if (t.msix.enabled && is(LEGACY_REG.queueVector, 2)) {
    putLe(data, q ? t.queueVectors[c.queueSel] : 0xffff);
  } else data.fill(0xff);
}

/** A guest write of the legacy block (a promise while a STATUS reset waits for in-flight I/O). */
export function legacyWrite(t: VirtioPci, off: number, data: Uint8Array): void | Promise<void> {
  const c = t.core;
  const v = leValue(data);
  const cfg = legacyConfigOffset(t);
  const is = (at: number, size: number) => off === at && data.length === size;
  const reset = is(LEGACY_REG.status, 1) && v === 0;
  if (!t.claim("legacy", reset)) return;
  if (off >= cfg) {
    t.device.writeConfig(off - cfg, data);
    return;
  }
  const q = c.queue;
  if (is(LEGACY_REG.guestFeatures, 4)) c.setDriverFeatureWord(0, v);
  else if (is(LEGACY_REG.queuePfn, 4)) {
    if (v === 0) c.disableQueue(c.queueSel);
    else if (q && c.queueWritable) {
      const size = q.maxSize;
      const desc = v * LEGACY_VRING_ALIGN;
      q.size = size;
      q.descAddr = desc;
      q.availAddr = desc + 16 * size;
      q.usedAddr = Math.ceil((q.availAddr + 6 + 2 * size) / LEGACY_VRING_ALIGN) * LEGACY_VRING_ALIGN;
      q.ready = true;
    }
  } else if (is(LEGACY_REG.queueSel, 2)) c.queueSel = v;
  else if (is(LEGACY_REG.queueNotify, 2)) c.notify(v);
  else if (is(LEGACY_REG.status, 1)) {
    // Legacy drivers never set FEATURES_OK; the core's legacy rules apply (no such step).
    return c.writeStatus(v & ~STATUS.FEATURES_OK);
  } else if (t.msix.enabled && is(LEGACY_REG.configVector, 2)) t.configVector = t.vectorValue(v);
  else if (t.msix.enabled && is(LEGACY_REG.queueVector, 2)) {
    if (q) t.queueVectors[c.queueSel] = t.vectorValue(v);
  }
}
