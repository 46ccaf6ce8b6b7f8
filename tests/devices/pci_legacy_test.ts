/**
 * Legacy and transitional virtio-PCI in plain memory: the 0.9.5 register block in the I/O
 * BAR, the config offset following the live MSI-X enable bit, the legacy ring layout,
 * ISR read-to-clear, reset, hostile accesses, and how a transitional function picks its
 * mode and refuses a driver that mixes the two interfaces.
 */

import assert from "node:assert/strict";
import { CMD } from "../../devices/pci/config_space.ts";
import { PciBus } from "../../devices/pci/bus.ts";
import { VirtioRng } from "../../devices/virtio/rng.ts";
import { VirtioBlk } from "../../devices/virtio/blk.ts";
import type { BlockBackend } from "../../devices/virtio/blk_backend.ts";
import { STATUS, type VirtioDevice } from "../../devices/virtio/device.ts";
import { MSIX_BAR, type PciFlavor, VirtioPci } from "../../transports/pci.ts";
import { LEGACY_REG as R } from "../../transports/pci_legacy.ts";
import { CountingIrq, F, GuestRam } from "../harness/virtio_driver.ts";
import { ModernDriver, PortConfig, RecordingRouter } from "../harness/pci_driver.ts";

function fn(flavor: PciFlavor, device: VirtioDevice = new VirtioRng({ fill: (b) => b.fill(0x77) })) {
  const ram = new GuestRam(1 << 20);
  const router = new RecordingRouter();
  const intx = new CountingIrq();
  const t = new VirtioPci(device, ram.mem, { intx, msi: router, flavor });
  const bus = new PciBus();
  const cfg = new PortConfig(bus, bus.add(t));
  t.config.setCommand(CMD.IO | CMD.MEMORY | CMD.BUS_MASTER);
  const io = t.barHandlers().find((h) => h.kind === "io")!;
  const r = (off: number, size: number) => {
    const d = new Uint8Array(size);
    io.read(off, d);
    return d.reduce((v, b, i) => v + b * 2 ** (8 * i), 0);
  };
  const w = (off: number, size: number, v: number) => {
    const d = new Uint8Array(size);
    for (let i = 0; i < size; i++) d[i] = Math.floor(v / 2 ** (8 * i)) & 0xff;
    return io.write(off, d);
  };
  return { ram, router, intx, t, cfg, r, w };
}

/** A disk backend that answers every call at once without data (for register-level tests). */
function idleDisk(size: number, identity: string): BlockBackend {
  const done = () => Promise.resolve();
  return {
    size,
    readonly: false,
    identity,
    read: done,
    write: done,
    flush: done,
    discard: done,
    writeZeroes: done,
    close: done,
  };
}

/** A legacy driver's queue: PFN-placed rings (4096 alignment) of the device's size. */
function legacyQueue(ram: GuestRam, size: number) {
  const base = ram.alloc(3 * 4096 + 16 * size, 4096);
  const desc = base, avail = base + 16 * size;
  const used = Math.ceil((avail + 6 + 2 * size) / 4096) * 4096;
  let idx = 0;
  return {
    pfn: base / 4096,
    add(addr: number, len: number) {
      const dv = ram.dv(desc + 16 * (idx % size), 16);
      dv.setBigUint64(0, BigInt(addr), true);
      dv.setUint32(8, len, true);
      dv.setUint16(12, 2, true); // device-writable
      ram.dv(avail + 4 + 2 * (idx % size), 2).setUint16(0, idx % size, true);
      idx++;
      ram.dv(avail + 2, 2).setUint16(0, idx, true);
    },
    usedIdx: () => ram.dv(used + 2, 2).getUint16(0, true),
    usedLen: (i: number) => ram.dv(used + 4 + 8 * i + 4, 4).getUint32(0, true),
  };
}

Deno.test("pci-legacy: transitional IDs, revision 0, subsystem = virtio ID, I/O BAR 0 and MSI-X BAR 1, no modern caps", () => {
  const { cfg } = fn("legacy");
  assert.equal(cfg.read(0, 2), 0x1af4);
  assert.equal(cfg.read(2, 2), 0x1005, "rng's transitional device ID");
  assert.equal(cfg.read(8, 1), 0, "revision 0");
  assert.equal(cfg.read(0x2c, 2), 0x1af4);
  assert.equal(cfg.read(0x2e, 2), 4, "subsystem device = virtio ID");
  assert.equal(cfg.read(0x10, 4) & 1, 1, "BAR 0 is I/O");
  assert.equal(cfg.read(0x14, 4) & 1, 0, "BAR 1 is memory");
  assert.deepEqual(cfg.capabilities().map(([id]) => id), [0x11], "MSI-X only");
  const blk = fn(
    "legacy",
    new VirtioBlk(idleDisk(1 << 20, "x")),
  );
  assert.equal(blk.cfg.read(2, 2), 0x1001, "blk's transitional device ID");
  assert.equal(blk.cfg.read(0x0b, 1), 0x01, "mass storage class");
});

Deno.test("pci-legacy: every register; a request through PFN rings; ISR read-to-clear with INTx", () => {
  const { ram, intx, t, r, w } = fn("legacy");
  assert.equal(r(R.hostFeatures, 4), Number(t.device.features & 0xffff_ffffn), "bits 0-31, no VERSION_1");
  void w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  void w(R.guestFeatures, 4, Number(F.EVENT_IDX));
  assert.equal(r(R.guestFeatures, 4), Number(F.EVENT_IDX));
  void w(R.queueSel, 2, 0);
  assert.equal(r(R.queueNum, 2), 256, "QUEUE_NUM: the device's size");
  void w(R.queueNum, 2, 16);
  assert.equal(r(R.queueNum, 2), 256, "read-only");
  void w(R.queueSel, 2, 3);
  assert.equal(r(R.queueNum, 2), 0, "no queue 3");
  void w(R.queueSel, 2, 0);
  const q = legacyQueue(ram, 256);
  void w(R.queuePfn, 4, q.pfn);
  assert.equal(r(R.queuePfn, 4), q.pfn);
  void w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  assert.equal(r(R.status, 1) & STATUS.DEVICE_NEEDS_RESET, 0, "no FEATURES_OK step on legacy");
  const buf = ram.alloc(64);
  q.add(buf, 64);
  void w(R.queueNotify, 2, 0);
  assert.equal(q.usedIdx(), 1);
  assert.equal(q.usedLen(0), 64);
  assert.ok(ram.view(buf, 64).every((b) => b === 0x77));
  assert.equal(intx.count, 1);
  assert.equal(r(R.isr, 1), 1, "used-buffer bit");
  assert.equal(r(R.isr, 1), 0, "read-to-clear");
  // QUEUE_PFN 0 takes the queue out of service.
  void w(R.queuePfn, 4, 0);
  assert.equal(r(R.queuePfn, 4), 0);
  q.add(ram.alloc(8), 8);
  void w(R.queueNotify, 2, 0);
  assert.equal(q.usedIdx(), 1, "not served");
  // Reset: STATUS 0 clears everything.
  assert.equal(w(R.status, 1, 0), undefined);
  assert.equal(r(R.status, 1), 0);
  assert.equal(r(R.guestFeatures, 4), 0);
});

Deno.test("pci-legacy: the vector registers appear and the config moves from 20 to 24 with the live MSI-X enable bit", () => {
  const blkCfg = new Uint8Array(60);
  const dev = new VirtioBlk(idleDisk(8 << 20, "legacy-cfg"));
  dev.readConfig(0, blkCfg);
  const capacity = new DataView(blkCfg.buffer).getUint32(0, true);
  const { t, r, w, ram } = fn("legacy", dev);
  assert.equal(r(20, 4), capacity, "config at 20 without MSI-X");
  assert.equal(r(20, 2) | (r(22, 2) << 16), capacity, "a field read in pieces is the same");
  const msixCap = t.config.bytes[0x34];
  t.config.write(msixCap + 2, new Uint8Array([0, 0x80]));
  assert.ok(t.msix.enabled);
  assert.equal(r(24, 4), capacity, "config at 24 with MSI-X");
  assert.equal(r(R.configVector, 2), 0xffff);
  void w(R.configVector, 2, 0);
  assert.equal(r(R.configVector, 2), 0);
  void w(R.queueSel, 2, 0);
  void w(R.queueVector, 2, 5);
  assert.equal(r(R.queueVector, 2), 0xffff, "no vector 5 (2 vectors): NO_VECTOR");
  void w(R.queueVector, 2, 1);
  assert.equal(r(R.queueVector, 2), 1);
  // Used buffers go to the queue's vector through the table in BAR 1.
  const msix = t.barHandlers().find((h) => h.index === MSIX_BAR.index)!;
  const e = new Uint8Array(16);
  new DataView(e.buffer).setUint32(0, 0xfee0_0000, true);
  void msix.write(16, e);
  void w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  const q = legacyQueue(ram, 256);
  void w(R.queuePfn, 4, q.pfn);
  void w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  t.config.write(msixCap + 2, new Uint8Array([0, 0])); // off again: config back at 20
  assert.equal(r(20, 4), capacity);
});

Deno.test("pci-legacy: hostile accesses (any offset, width, value; PFN outside RAM; bad queue select) keep it sane", () => {
  const { ram, r, w, t } = fn("legacy");
  void w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  void w(R.queuePfn, 4, 0xffff_ffff); // rings far outside RAM
  void w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  assert.ok(r(R.status, 1) & STATUS.DEVICE_NEEDS_RESET, "rings outside RAM: NEEDS_RESET");
  void w(R.queueNotify, 2, 7);
  void w(R.queueSel, 2, 0xffff);
  void w(R.queuePfn, 4, 12);
  assert.equal(r(R.queuePfn, 4), 0);
  let seed = 7;
  const rand = (n: number) => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % n;
  for (let i = 0; i < 5000; i++) {
    const width = [1, 2, 4, 8][rand(4)];
    const off = rand(0x90);
    const d = new Uint8Array(width).map(() => rand(256));
    if (rand(2)) r(off, width);
    else if (!(off === R.status && width === 1)) void t.barHandlers()[0].write(off, d);
  }
  // A reset brings it back.
  void w(R.status, 1, 0);
  void w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  void w(R.queueSel, 2, 0);
  const q = legacyQueue(ram, 256);
  void w(R.queuePfn, 4, q.pfn);
  void w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  q.add(ram.alloc(16), 16);
  void w(R.queueNotify, 2, 0);
  assert.equal(q.usedIdx(), 1);
});

Deno.test("pci-transitional: the first interface used decides; mixing sets NEEDS_RESET; a reset frees the choice", () => {
  // Modern first (what Linux does by default).
  const a = fn("transitional");
  assert.equal(a.cfg.read(2, 2), 0x1005);
  assert.equal(a.cfg.read(8, 1), 0);
  const d = new ModernDriver(a.t, a.cfg);
  assert.equal(d.layout.common, 0, "modern structures found through the capabilities");
  assert.equal(a.cfg.read(0x20, 4) & 0x6, 0x4, "in 64-bit BAR 4");
  assert.equal(d.negotiate(F.VERSION_1), true);
  assert.equal(a.t.mode, "modern");
  void a.w(R.guestFeatures, 4, 0);
  assert.ok(d.c(0x14, 1) & STATUS.DEVICE_NEEDS_RESET, "a legacy write to a modern-mode device");
  void d.cw(0x14, 1, 0);
  assert.equal(a.t.mode, undefined, "reset frees the choice");
  // Legacy first (virtio_pci.force_legacy=1).
  const b = fn("transitional");
  void b.w(R.status, 1, STATUS.ACKNOWLEDGE);
  assert.equal(b.t.mode, "legacy");
  assert.equal(b.r(R.hostFeatures, 4), Number(b.t.device.features & 0xffff_ffffn));
  const bd = new ModernDriver(b.t, b.cfg);
  void bd.cw(0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  assert.ok(b.r(R.status, 1) & STATUS.DEVICE_NEEDS_RESET, "a modern write to a legacy-mode device");
  assert.equal(b.r(R.status, 1) & STATUS.DRIVER, 0, "and it was not applied");
  // Legacy mode: no VERSION_1, no FEATURES_OK needed; a request works.
  void b.w(R.status, 1, 0);
  void b.w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  void b.w(R.guestFeatures, 4, 0);
  void b.w(R.queueSel, 2, 0);
  const q = legacyQueue(b.ram, 256);
  void b.w(R.queuePfn, 4, q.pfn);
  void b.w(R.status, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  q.add(b.ram.alloc(32), 32);
  void b.w(R.queueNotify, 2, 0);
  assert.equal(q.usedIdx(), 1);
});
