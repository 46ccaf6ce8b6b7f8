/**
 * PCI in plain memory: configuration space rules, bus 0 through 0xCF8/0xCFC and ECAM,
 * MSI-X masking and pending-bit replay, and the modern virtio-PCI transport driven as a
 * driver would, including hostile accesses.
 */

import assert from "node:assert/strict";
import { CMD, PciConfigSpace } from "../../devices/pci/config_space.ts";
import { PciBus } from "../../devices/pci/bus.ts";
import { MsixTable } from "../../devices/pci/msix.ts";
import { VirtioRng } from "../../devices/virtio/rng.ts";
import { STATUS } from "../../devices/virtio/device.ts";
import { MODERN_BAR, VIRTIO_MSI_NO_VECTOR, VirtioPci } from "../../transports/pci.ts";
import { isMsiAddress } from "../../vmm/irq_routing.ts";
import { CountingIrq, DriverQueue, F, GuestRam } from "../harness/virtio_driver.ts";
import { ModernDriver, PortConfig, RecordingRouter } from "../harness/pci_driver.ts";

function space(): PciConfigSpace {
  const c = new PciConfigSpace({
    vendor: 0x1234,
    device: 0x5678,
    revision: 3,
    classCode: 0x020000,
    interruptPin: 1,
  });
  c.addBar({ index: 0, kind: "mem32", size: 0x1000 }, 0xc000_0000);
  c.addBar({ index: 1, kind: "mem64", size: 0x4000, prefetchable: true }, 0xc001_0000);
  c.addBar({ index: 3, kind: "io", size: 0x20 }, 0xc000);
  return c;
}

const r32 = (c: PciConfigSpace, o: number) => {
  const d = new Uint8Array(4);
  c.read(o, d);
  return new DataView(d.buffer).getUint32(0, true);
};
const w32 = (c: PciConfigSpace, o: number, v: number) => {
  const d = new Uint8Array(4);
  new DataView(d.buffer).setUint32(0, v >>> 0, true);
  c.write(o, d);
};

Deno.test("pci config: identity is read-only; command and interrupt line are writable; status error bits W1C", () => {
  const c = space();
  w32(c, 0x00, 0xffff_ffff);
  assert.equal(r32(c, 0x00), 0x5678_1234);
  w32(c, 0x08, 0);
  assert.equal(r32(c, 0x08), 0x0200_0003, "class and revision");
  c.write(0x04, new Uint8Array([0xff, 0xff]));
  assert.equal(
    c.command,
    CMD.IO | CMD.MEMORY | CMD.BUS_MASTER | CMD.INTX_DISABLE,
    "only the writable bits stick",
  );
  c.write(0x3c, new Uint8Array([11, 7]));
  assert.deepEqual([c.bytes[0x3c], c.bytes[0x3d]], [11, 1], "line writable, pin read-only");
  c.bytes[0x07] = 0x80; // as if the device had signalled a parity error
  c.write(0x06, new Uint8Array([0, 0x80]));
  assert.equal(c.bytes[0x07], 0, "write 1 clears");
});

Deno.test("pci config: BAR sizing for 32-bit, 64-bit and I/O BARs, and restore", () => {
  const c = space();
  const moved: number[] = [];
  c.onBarChange = (b) => moved.push(b.index);
  w32(c, 0x10, 0xffff_ffff);
  assert.equal(r32(c, 0x10), 0xffff_f000, "4 KiB, 32-bit, not prefetchable");
  w32(c, 0x10, 0xc000_0000);
  assert.equal(r32(c, 0x10), 0xc000_0000);
  w32(c, 0x14, 0xffff_ffff);
  w32(c, 0x18, 0xffff_ffff);
  assert.equal(r32(c, 0x14), 0xffff_c00c, "16 KiB, 64-bit, prefetchable");
  assert.equal(r32(c, 0x18), 0xffff_ffff);
  w32(c, 0x14, 0xc001_0000);
  w32(c, 0x18, 0x1);
  assert.equal(c.bar(1)!.address, 0x1_c001_0000, "the upper half moves a 64-bit BAR above 4 GiB");
  w32(c, 0x1c, 0xffff_ffff);
  assert.equal(r32(c, 0x1c), 0xffff_ffe1, "32 ports, I/O");
  w32(c, 0x20, 0xffff_ffff);
  assert.equal(r32(c, 0x20), 0, "an unimplemented BAR reads 0");
  c.write(0x11, new Uint8Array([0x20])); // one byte of a BAR
  assert.equal(r32(c, 0x10), 0xc000_2000);
  assert.ok(moved.length >= 5);
});

Deno.test("pci config: the capability chain links every capability in order; past 256 reads 0", () => {
  const c = space();
  const a = c.addCapability(0x05, new Uint8Array(8));
  const b = c.addCapability(0x09, new Uint8Array([16, 1, 0, 0]));
  assert.equal(c.bytes[0x34], a);
  assert.equal(c.bytes[a + 1], b);
  assert.equal(c.bytes[b + 1], 0);
  assert.ok(c.u16(0x06) & 0x10, "status: capability list");
  const d = new Uint8Array(4).fill(0xee);
  c.read(0x100, d);
  assert.deepEqual([...d], [0, 0, 0, 0]);
});

Deno.test("pci bus: 0xCF8/0xCFC with every width and alignment; ECAM; absent functions read all ones", () => {
  const bus = new PciBus();
  const c = space();
  const slot = bus.add({ config: c });
  assert.equal(slot, 1);
  const p = new PortConfig(bus, 0);
  assert.equal(p.read(0, 4), 0x0d57_8086, "host bridge");
  assert.equal(p.read(0x0a, 2), 0x0600, "class: host bridge");
  const dev = new PortConfig(bus, slot);
  assert.equal(dev.read(0, 2), 0x1234);
  assert.equal(dev.read(2, 2), 0x5678);
  assert.equal(dev.read(3, 1), 0x56);
  assert.equal(dev.read(1, 1), 0x12);
  dev.write(0x3c, 1, 9);
  assert.equal(dev.read(0x3c, 1), 9);
  assert.equal(new PortConfig(bus, 7).read(0, 4), 0xffff_ffff, "no device 7");
  // Enable bit clear: the data port reads all ones.
  bus.ports.write(0, new Uint8Array([0, 0x08, 0, 0]));
  const d = new Uint8Array(4);
  bus.ports.read(4, d);
  assert.deepEqual([...d], [0xff, 0xff, 0xff, 0xff]);
  // A dword through 0xCFE would cross the data register: all ones.
  bus.ports.write(0, new Uint8Array([0, 0x08, 0, 0x80]));
  bus.ports.read(6, d);
  assert.deepEqual([...d], [0xff, 0xff, 0xff, 0xff]);
  // The address register answers dword accesses only.
  const b1 = new Uint8Array(1);
  bus.ports.read(0, b1);
  assert.equal(b1[0], 0xff);
  // ECAM: device 1 at 1 << 15.
  const e = new Uint8Array(2);
  bus.ecam.read((slot << 15) + 2, e);
  assert.equal(e[0] | (e[1] << 8), 0x5678);
  bus.ecam.write((slot << 15) + 0x3c, new Uint8Array([5]));
  assert.equal(dev.read(0x3c, 1), 5);
  bus.ecam.read((3 << 15) + 0, e);
  assert.deepEqual([...e], [0xff, 0xff]);
  bus.ecam.read((slot << 15) | (1 << 12), e);
  assert.deepEqual([...e], [0xff, 0xff], "function 1 is absent");
  const cross = new Uint8Array(4);
  bus.ecam.read((slot << 15) + 0xffe, cross);
  assert.deepEqual([...cross], [0xff, 0xff, 0xff, 0xff], "an access crossing the 4 KiB page");
});

Deno.test("msi-x: vectors start masked; a masked vector goes pending and is delivered on unmask", () => {
  const router = new RecordingRouter();
  const m = new MsixTable(3, router);
  const entry = (i: number, masked: boolean) => {
    const b = new Uint8Array(16);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, 0xfee0_0000, true);
    dv.setUint32(8, 0x40 + i, true);
    dv.setUint32(12, masked ? 1 : 0, true);
    m.writeTable(16 * i, b);
  };
  m.fire(0);
  assert.deepEqual(router.signals, [], "MSI-X disabled: nothing delivered");
  m.setMessageControl(0x8000);
  entry(0, true);
  m.fire(0);
  assert.ok(m.isPending(0));
  const pba = new Uint8Array(8);
  m.readPba(0, pba);
  assert.equal(pba[0], 1, "pending bit visible in the PBA");
  entry(0, false);
  assert.deepEqual(router.signals, [0], "delivered on unmask");
  assert.equal(m.isPending(0), false);
  m.setMessageControl(0x8000 | 0x4000); // function mask
  m.fire(0);
  assert.deepEqual(router.signals, [0]);
  m.setMessageControl(0x8000);
  assert.deepEqual(router.signals, [0, 0], "function unmask replays");
  assert.equal(router.table[0].masked, false);
  assert.equal(router.table[1].masked, true);
  m.fire(99);
  m.writeTable(0x1000, new Uint8Array(4));
  assert.equal(m.messageControl & 0x7ff, 2, "table size - 1");
  assert.ok(isMsiAddress(0xfee0_1000, 0));
  assert.equal(isMsiAddress(0xfed0_0000, 0), false, "outside 0xFEExxxxx: no route");
  assert.equal(isMsiAddress(0xfee0_0000, 1), false);
});

function modernRng() {
  const ram = new GuestRam(1 << 20);
  const router = new RecordingRouter();
  const intx = new CountingIrq();
  const t = new VirtioPci(new VirtioRng({ fill: (b) => b.fill(0xab) }), ram.mem, { intx, msi: router });
  const bus = new PciBus();
  const slot = bus.add(t);
  const cfg = new PortConfig(bus, slot);
  t.config.setCommand(CMD.MEMORY | CMD.BUS_MASTER);
  return { ram, router, intx, t, bus, cfg, d: new ModernDriver(t, cfg) };
}

Deno.test("virtio-pci modern: IDs, capabilities, and common config registers", () => {
  const { cfg, d, t } = modernRng();
  assert.equal(cfg.read(0, 2), 0x1af4);
  assert.equal(cfg.read(2, 2), 0x1044, "0x1040 + rng");
  assert.equal(cfg.read(8, 1), 1, "revision 1");
  assert.equal(cfg.read(0x2c, 2), 0x1af4, "subsystem vendor");
  const l = d.layout;
  assert.deepEqual(
    [l.common, l.notify, l.multiplier, l.isr, l.device],
    [MODERN_BAR.common, MODERN_BAR.notify, 4, MODERN_BAR.isr, MODERN_BAR.device],
  );
  assert.ok(l.pciCfg > 0 && l.msix > 0);
  assert.equal(d.c(0x12, 2), 1, "num_queues");
  d.cw(0x00, 4, 1);
  assert.equal(d.c(0x04, 4), 1, "device_feature word 1: VERSION_1");
  d.cw(0x00, 4, 0);
  assert.ok(d.c(0x04, 4) & (1 << 28), "indirect descriptors offered");
  assert.equal(d.negotiate(F.VERSION_1 | F.EVENT_IDX), true);
  d.cw(0x08, 4, 0);
  assert.equal(d.c(0x0c, 4), 1 << 29, "driver_feature reads back");
  d.cw(0x16, 2, 0);
  assert.equal(d.c(0x18, 2), 256, "queue_size starts at the maximum");
  assert.equal(d.c(0x1e, 2), 0, "queue_notify_off");
  d.cw(0x16, 2, 5);
  assert.equal(d.c(0x18, 2), 0, "a queue that does not exist has size 0");
  d.cw(0x1a, 2, 0);
  assert.equal(d.c(0x1a, 2), VIRTIO_MSI_NO_VECTOR, "no vector for a missing queue");
  d.cw(0x16, 2, 0);
  d.cw(0x1a, 2, 7);
  assert.equal(d.c(0x1a, 2), VIRTIO_MSI_NO_VECTOR, "vector 7 does not exist (2 vectors): NO_VECTOR");
  d.cw(0x1a, 2, 1);
  assert.equal(d.c(0x1a, 2), 1);
  d.cw(0x10, 2, 0);
  assert.equal(d.c(0x10, 2), 0, "msix_config");
  d.cw(0x20, 8, 0x1234_5000);
  assert.equal(d.c(0x20, 4), 0x1234_5000, "64-bit queue_desc, read as two halves");
  assert.equal(d.c(0x24, 4), 0);
  assert.equal(t.core.queues[0].descAddr, 0x1234_5000);
});

Deno.test("virtio-pci modern: an rng request with MSI-X delivers the queue's vector; config change its own", () => {
  const { ram, router, intx, d } = modernRng();
  d.enableMsix();
  d.msixEntry(0, 0xfee0_0000, 0x30, false);
  d.msixEntry(1, 0xfee0_0000, 0x31, false);
  d.cw(0x10, 2, 0);
  assert.equal(d.negotiate(F.VERSION_1), true);
  d.cw(0x10, 2, 0);
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q, 1);
  d.driverOk();
  const buf = ram.alloc(32);
  q.add([{ addr: buf, len: 32, write: true }]);
  d.notify(0);
  assert.deepEqual(q.takeUsed(), [[0, 32]]);
  assert.deepEqual(router.signals, [1], "the queue's vector");
  assert.equal(intx.count, 0, "no INTx while MSI-X is on");
  assert.equal(d.r(d.layout.isr, 1), 0, "ISR untouched under MSI-X");
  // A broken ring: NEEDS_RESET and a config interrupt on msix_config.
  q.setAvailIdx(q.usedIdx() + 100);
  d.notify(0);
  assert.ok(d.c(0x14, 1) & STATUS.DEVICE_NEEDS_RESET);
  assert.deepEqual(router.signals, [1, 0]);
});

Deno.test("virtio-pci modern: INTx when MSI-X is off; ISR is read-to-clear; INTx disable holds the line", () => {
  const { ram, intx, d, t } = modernRng();
  d.negotiate(F.VERSION_1);
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q);
  d.driverOk();
  q.add([{ addr: ram.alloc(8), len: 8, write: true }]);
  d.notify(0);
  assert.equal(intx.count, 1);
  assert.ok(t.intxPending);
  assert.equal(d.r(d.layout.isr, 1), 1, "used-buffer bit");
  assert.equal(d.r(d.layout.isr, 1), 0, "cleared by the read");
  assert.equal(t.intxPending, false);
  t.config.setCommand(t.config.command | CMD.INTX_DISABLE);
  q.add([{ addr: ram.alloc(8), len: 8, write: true }]);
  d.notify(0);
  assert.equal(intx.count, 1, "INTx disabled in the command register");
});

Deno.test("virtio-pci modern: reset clears status, selectors and vectors; PCI_CFG window reaches the BAR", () => {
  const { ram, d, cfg, t } = modernRng();
  d.negotiate(F.VERSION_1);
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q, 1);
  d.cw(0x10, 2, 0);
  d.driverOk();
  d.cw(0x16, 2, 0);
  assert.equal(d.cw(0x14, 1, 0), undefined, "nothing in flight: done at once");
  assert.equal(d.c(0x14, 1), 0);
  assert.equal(d.c(0x10, 2), VIRTIO_MSI_NO_VECTOR);
  assert.equal(d.c(0x1a, 2), VIRTIO_MSI_NO_VECTOR);
  assert.equal(d.c(0x1c, 2), 0, "queue disabled");
  assert.equal(t.core.queues[0].ready, false);
  // VIRTIO_PCI_CAP_PCI_CFG: bar 0, offset of num_queues, length 2, then read the data.
  const c = d.layout.pciCfg;
  cfg.write(c + 4, 1, 0);
  cfg.write(c + 8, 4, MODERN_BAR.common + 0x12);
  cfg.write(c + 12, 4, 2);
  assert.equal(cfg.read(c + 16, 2), 1, "num_queues through config space");
  cfg.write(c + 8, 4, MODERN_BAR.common + 0x14);
  cfg.write(c + 12, 4, 1);
  cfg.write(c + 16, 1, STATUS.ACKNOWLEDGE);
  assert.equal(d.c(0x14, 1), STATUS.ACKNOWLEDGE, "device_status written through config space");
  cfg.write(c + 8, 4, 0x7fff_ffff); // outside the BAR: ignored
  assert.equal(cfg.read(c + 16, 1), STATUS.ACKNOWLEDGE);
});

Deno.test("virtio-pci modern: queue fields freeze at DRIVER_OK; notify of a missing or disabled queue is ignored", () => {
  const { ram, d, t } = modernRng();
  d.negotiate(F.VERSION_1);
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q);
  d.driverOk();
  d.cw(0x16, 2, 0);
  d.cw(0x18, 2, 4);
  d.cw(0x20, 4, 0x9000);
  assert.equal(t.core.queues[0].size, 16);
  assert.equal(t.core.queues[0].descAddr, q.descAddr);
  d.cw(0x1c, 2, 0);
  assert.equal(d.c(0x1c, 2), 1, "queue_enable 0 is not the driver's to write");
  void d.w(MODERN_BAR.notify + 4 * 3, 2, 3);
  void d.w(MODERN_BAR.notify + 1, 1, 0);
  assert.equal(t.core.counters.notifies, 0);
});

Deno.test("virtio-pci modern: hostile config space, BAR and MSI-X accesses in every status state keep it serving", () => {
  let seed = 12345;
  const rand = (n: number) => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return seed % n;
  };
  for (const status of [0, 1, 3, 11, 15, 0x4f]) {
    const { ram, d, t, bus } = modernRng();
    void d.cw(0x14, 1, status);
    for (let i = 0; i < 3000; i++) {
      const width = [1, 2, 4, 8][rand(4)];
      const data = new Uint8Array(width).map(() => rand(256));
      const off = rand(3) === 0 ? rand(0x40) : rand(0x9000);
      if (rand(2)) t.barRead(off, data);
      else if (off !== MODERN_BAR.common + 0x14) void t.barWrite(off, data);
      const co = rand(0x120);
      if (rand(2)) bus.readConfig(0, 1, 0, co, new Uint8Array(width));
      else if (co >= 0x40) bus.writeConfig(0, 1, 0, co, data); // keep the header's BARs and command
    }
    // A driver that resets and starts over gets a working device.
    t.config.setCommand(CMD.MEMORY | CMD.BUS_MASTER);
    t.msix.setMessageControl(0);
    assert.equal(d.negotiate(F.VERSION_1), true, `status 0x${status.toString(16)}`);
    const q = new DriverQueue(ram, 8);
    d.setupQueue(0, q);
    d.driverOk();
    q.add([{ addr: ram.alloc(8), len: 8, write: true }]);
    d.notify(0);
    assert.deepEqual(q.takeUsed(), [[0, 8]]);
  }
});
