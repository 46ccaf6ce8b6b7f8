/** virtio-MMIO v2 and v1 register files, driven from the driver side in plain memory. */

import assert from "node:assert/strict";
import { CountingIrq, DriverQueue, F, GuestRam, MmioDriver } from "../harness/virtio_driver.ts";
import { VirtioMmio } from "../../transports/mmio.ts";
import { VirtioMmioLegacy } from "../../transports/mmio_legacy.ts";
import { VirtioRng } from "../../devices/virtio/rng.ts";
import { STATUS } from "../../devices/virtio/device.ts";
import type { SharedCell } from "../../vmm/shared_regs.ts";

const rng = () => new VirtioRng({ fill: (b) => b.fill(0xab) });

function modern() {
  const ram = new GuestRam();
  const irq = new CountingIrq();
  const t = new VirtioMmio(rng(), ram.mem, irq);
  return { ram, irq, t, d: new MmioDriver(t) };
}

Deno.test("mmio v2: identity registers and 64-bit features with VERSION_1", () => {
  const { d } = modern();
  assert.equal(d.r32(0x000), 0x74726976, "magic 'virt'");
  assert.equal(d.r32(0x004), 2);
  assert.equal(d.r32(0x008), 4, "rng");
  const f = d.deviceFeatures();
  assert.ok(f & F.VERSION_1);
  assert.ok(f & F.INDIRECT && f & F.EVENT_IDX);
  d.w32(0x014, 7);
  assert.equal(d.r32(0x010), 0, "feature words past 1 read 0");
});

Deno.test("mmio v2: FEATURES_OK is refused when the driver acks an unoffered bit", () => {
  const { d } = modern();
  assert.equal(d.negotiate(F.VERSION_1 | (1n << 40n)), false);
  assert.equal(d.negotiate(F.VERSION_1 | F.EVENT_IDX), true);
});

Deno.test("mmio v2: queue selector bounds, QueueNumMax, QueueReady read-back", () => {
  const { d, ram } = modern();
  d.negotiate(F.VERSION_1);
  d.w32(0x030, 0);
  assert.equal(d.r32(0x034), 256);
  d.w32(0x030, 5);
  assert.equal(d.r32(0x034), 0, "no queue 5");
  d.w32(0x044, 1);
  assert.equal(d.r32(0x044), 0, "writes to a missing queue go nowhere");
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q);
  d.w32(0x030, 0);
  assert.equal(d.r32(0x044), 1);
});

Deno.test("mmio v2: a working rng request, interrupt status and ACK", () => {
  const { d, ram, irq } = modern();
  d.negotiate(F.VERSION_1);
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q);
  d.driverOk();
  const buf = ram.alloc(64);
  q.add([{ addr: buf, len: 64, write: true }]);
  d.notify(0);
  assert.deepEqual(q.takeUsed(), [[0, 64]]);
  assert.ok(ram.view(buf, 64).every((b) => b === 0xab));
  assert.equal(irq.count, 1);
  assert.equal(d.ackInterrupts(), 1);
  assert.equal(d.r32(0x060), 0);
});

Deno.test("mmio v2: queue fields are read-only after DRIVER_OK", () => {
  const { d, ram, t } = modern();
  d.negotiate(F.VERSION_1);
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q);
  d.driverOk();
  d.w32(0x038, 4);
  d.w32(0x080, 0x1234);
  assert.equal(t.core.queues[0].size, 16);
  assert.equal(t.core.queues[0].descAddr, q.descAddr);
});

Deno.test("mmio v2: writing 0 to Status resets queues, interrupts and selectors", () => {
  const { d, ram, t } = modern();
  d.negotiate(F.VERSION_1);
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q);
  d.driverOk();
  q.add([{ addr: ram.alloc(8), len: 8, write: true }]);
  d.notify(0);
  d.w32(0x014, 1);
  d.w32(0x030, 3);
  assert.equal(d.r32(0x060), 1);
  d.w32(0x070, 0);
  assert.equal(d.status(), 0);
  assert.equal(d.r32(0x060), 0, "interrupt status cleared");
  assert.equal(t.core.queueSel, 0);
  assert.equal(t.core.deviceFeaturesSel, 0);
  assert.equal(t.core.driverFeatures, 0n);
  assert.equal(t.core.queues[0].ready, false);
  assert.equal(t.core.queues[0].nextAvail, 0);
  d.w32(0x030, 0);
  assert.equal(d.r32(0x044), 0, "QueueReady reads 0 after reset");
});

Deno.test("mmio v2: a bad queue at DRIVER_OK sets NEEDS_RESET, raises a config interrupt, bumps ConfigGeneration", () => {
  const { d, ram, irq } = modern();
  d.negotiate(F.VERSION_1);
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q);
  d.w32(0x038, 12); // not a power of two
  // QueueReady is already 1 and fields are frozen then; re-open the queue to change it.
  d.w32(0x044, 0);
  d.w32(0x038, 12);
  d.w32(0x044, 1);
  const gen = d.r32(0x0fc);
  d.driverOk();
  assert.ok(d.status() & STATUS.DEVICE_NEEDS_RESET);
  assert.equal(d.r32(0x060) & 2, 2, "config change interrupt");
  assert.equal(irq.count, 1);
  assert.notEqual(d.r32(0x0fc), gen);
});

Deno.test("mmio v2: a hostile chain on one device leaves another device serving", () => {
  const ram = new GuestRam();
  const bad = new MmioDriver(new VirtioMmio(rng(), ram.mem, new CountingIrq()));
  const good = new MmioDriver(new VirtioMmio(rng(), ram.mem, new CountingIrq()));
  const qb = new DriverQueue(ram, 8), qg = new DriverQueue(ram, 8);
  for (const [d, q] of [[bad, qb], [good, qg]] as const) {
    d.negotiate(F.VERSION_1);
    d.setupQueue(0, q);
    d.driverOk();
  }
  const a = ram.alloc(8);
  qb.setDesc(0, a, 8, 1 | 2, 0); // loops to itself
  qb.publish(0);
  bad.notify(0);
  assert.ok(bad.status() & STATUS.DEVICE_NEEDS_RESET);
  qg.add([{ addr: ram.alloc(32), len: 32, write: true }]);
  good.notify(0);
  assert.deepEqual(qg.takeUsed(), [[0, 32]]);
  assert.equal(good.status() & STATUS.DEVICE_NEEDS_RESET, 0);
  // The broken device ignores notifications until the driver resets it, then works again.
  bad.w32(0x070, 0);
  const q2 = new DriverQueue(ram, 8);
  bad.negotiate(F.VERSION_1);
  bad.setupQueue(0, q2);
  bad.driverOk();
  q2.add([{ addr: ram.alloc(8), len: 8, write: true }]);
  bad.notify(0);
  assert.deepEqual(q2.takeUsed(), [[0, 8]]);
});

Deno.test("mmio v2: DRIVER_OK without FEATURES_OK is a driver error", () => {
  const { d } = modern();
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  assert.ok(d.status() & STATUS.DEVICE_NEEDS_RESET);
});

Deno.test("mmio v1 (legacy): version 1, 32 feature bits without VERSION_1, PFN ring layout", () => {
  const ram = new GuestRam(1 << 20);
  const irq = new CountingIrq();
  const t = new VirtioMmioLegacy(rng(), ram.mem, irq);
  const d = new MmioDriver(t);
  assert.equal(d.r32(0x004), 1);
  const f = d.deviceFeatures();
  assert.equal(f >> 32n, 0n, "no high feature word on legacy");
  assert.ok(f & F.EVENT_IDX);
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  d.w32(0x024, 0);
  d.w32(0x020, Number(F.EVENT_IDX));
  d.w32(0x028, 4096); // GuestPageSize
  d.w32(0x030, 0);
  d.w32(0x038, 16);
  d.w32(0x03c, 4096); // QueueAlign
  const ringBase = ram.alloc(3 * 4096, 4096);
  d.w32(0x040, ringBase / 4096);
  assert.equal(d.r32(0x040), ringBase / 4096, "QueuePFN reads back");
  const q = t.core.queues[0];
  assert.equal(q.descAddr, ringBase);
  assert.equal(q.availAddr, ringBase + 256);
  assert.equal(q.usedAddr, ringBase + 4096, "used ring aligned to QueueAlign");
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  assert.equal(d.status() & STATUS.DEVICE_NEEDS_RESET, 0, "no FEATURES_OK needed on legacy");
  // Drive one request through the legacy layout.
  const dv = ram.dv(ringBase, 16);
  const buf = ram.alloc(16);
  dv.setBigUint64(0, BigInt(buf), true);
  dv.setUint32(8, 16, true);
  dv.setUint16(12, 2, true);
  ram.dv(ringBase + 256, 6).setUint16(2, 1, true); // avail.idx = 1, ring[0] = 0
  d.notify(0);
  assert.equal(ram.dv(ringBase + 4096 + 2, 2).getUint16(0, true), 1, "used.idx");
  assert.equal(irq.count, 1);
  d.w32(0x070, 0);
  assert.equal(d.r32(0x040), 0, "reset clears QueuePFN");
});

/** A modern rng device set up and running on a 16-entry queue. */
function running() {
  const m = modern();
  m.d.negotiate(F.VERSION_1);
  const q = new DriverQueue(m.ram, 16);
  m.d.setupQueue(0, q);
  m.d.driverOk();
  return { ...m, q };
}

/** Whether one rng request on `q` is served. */
function served(m: ReturnType<typeof running>, q = m.q): boolean {
  q.add([{ addr: m.ram.alloc(8), len: 8, write: true }]);
  m.d.notify(0);
  return q.takeUsed().length === 1;
}

Deno.test("status: the register is 8 bits wide; a write whose low byte is 0 resets", () => {
  const m = running();
  assert.ok(served(m));
  m.d.w32(0x070, 0x100);
  assert.equal(m.d.status(), 0);
  assert.equal(m.t.core.queues[0].ready, false, "0x100 reset the device");
  m.d.w32(0x070, 0x101);
  assert.equal(m.d.status(), STATUS.ACKNOWLEDGE, "bits above 7 are not stored");
});

Deno.test("status: a write that clears DRIVER_OK is ignored; queue fields stay frozen", () => {
  const m = running();
  m.d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
  assert.ok(m.d.status() & STATUS.DRIVER_OK, "DRIVER_OK cannot be cleared by the driver");
  m.d.w32(0x038, 1000);
  assert.equal(m.t.core.queues[0].size, 16, "QueueNum not writable while the device runs");
  assert.ok(served(m), "the device still serves");
});

Deno.test("status: after NEEDS_RESET, DRIVER_OK does not re-activate without a reset", () => {
  const m = running();
  m.q.setDesc(0, 0xfff_ffff_0000, 8, 2, 0); // outside RAM
  m.q.publish(0);
  m.d.notify(0);
  assert.ok(m.d.status() & STATUS.DEVICE_NEEDS_RESET);
  m.d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
  m.d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK | STATUS.DRIVER_OK);
  assert.equal(served(m, m.q), false, "still stopped");
  assert.ok(m.d.status() & STATUS.DEVICE_NEEDS_RESET);
  // Legacy: NEEDS_RESET before DRIVER_OK (a bad GuestPageSize) keeps the device stopped.
  const ram = new GuestRam(1 << 20);
  const t = new VirtioMmioLegacy(rng(), ram.mem, new CountingIrq());
  const d = new MmioDriver(t);
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  d.w32(0x028, 3000); // not a power of two
  d.w32(0x038, 16);
  d.w32(0x040, ram.alloc(3 * 4096, 4096) / 4096);
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  assert.equal(t.core.activated, false);
});

Deno.test("queues: QueueReady 0 (v2) and QueuePFN 0 (v1) take a running queue out of service", () => {
  const m = running();
  m.d.w32(0x030, 0);
  m.d.w32(0x044, 0);
  assert.equal(m.d.r32(0x044), 0, "QueueReady reads back 0");
  assert.equal(served(m), false, "a disabled queue is not served");
  m.d.w32(0x044, 1);
  assert.equal(m.d.r32(0x044), 0, "and cannot be re-enabled after DRIVER_OK");
  // Legacy.
  const ram = new GuestRam(1 << 20);
  const t = new VirtioMmioLegacy(rng(), ram.mem, new CountingIrq());
  const d = new MmioDriver(t);
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  d.w32(0x028, 4096);
  d.w32(0x038, 16);
  const base = ram.alloc(3 * 4096, 4096);
  d.w32(0x040, base / 4096);
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  d.w32(0x040, 0);
  assert.equal(d.r32(0x040), 0, "QueuePFN reads back 0");
  const buf = ram.alloc(16);
  ram.dv(base, 16).setBigUint64(0, BigInt(buf), true);
  ram.dv(base + 8, 8).setUint32(0, 16, true);
  ram.dv(base + 12, 2).setUint16(0, 2, true);
  ram.dv(base + 256, 6).setUint16(2, 1, true);
  d.notify(0);
  assert.equal(ram.dv(base + 4096 + 2, 2).getUint16(0, true), 0, "not served");
});

Deno.test("mmio v2: missing shared memory regions read length -1 and base all ones", () => {
  const { d } = modern();
  for (const sel of [0, 1, 255]) {
    d.w32(0x0ac, sel);
    for (const off of [0x0b0, 0x0b4, 0x0b8, 0x0bc]) {
      assert.equal(d.r32(off), 0xffff_ffff, `0x${off.toString(16)}`);
    }
  }
});

Deno.test("QueueNotify: the whole value is the queue index (0x10000 is no queue)", () => {
  const m = running();
  m.q.add([{ addr: m.ram.alloc(8), len: 8, write: true }]);
  m.d.notify(0x10000);
  assert.equal(m.q.takeUsed().length, 0);
  assert.equal(m.t.core.counters.ignoredNotifies, 1);
  m.d.notify(0);
  assert.equal(m.q.takeUsed().length, 1);
});

/**
 * A window read through its register page, as a guest with the page mapped read-only sees
 * it: reads from the page, writes through `keepCopy`, InterruptStatus a cell in the page.
 */
function paged<T extends VirtioMmio | VirtioMmioLegacy>(make: (isr: SharedCell) => T) {
  const words = new Int32Array(new SharedArrayBuffer(4096));
  const t = make({ array: words, index: 0x060 / 4 });
  const regs = t.keepCopy(words, 0);
  const bytes = new Uint8Array(words.buffer);
  const page = {
    read: (o: number, d: Uint8Array) => d.set(bytes.subarray(o, o + d.length)),
    write: (o: number, d: Uint8Array) => regs.write(o, d),
  };
  /** Every word of registers and config space reads the same from the page as from the file. */
  const same = (when: string) => {
    const a = new Uint8Array(4), b = new Uint8Array(4);
    for (let off = 0; off < 0x200; off += 4) {
      t.read(off, a);
      page.read(off, b);
      assert.deepEqual(b, a, `offset 0x${off.toString(16)} ${when}`);
    }
  };
  return { t, d: new MmioDriver(page), same };
}

Deno.test("register page (v2): the copy reads what the register file reads through setup, requests, a config change, NEEDS_RESET and a reset", async () => {
  const ram = new GuestRam();
  const irq = new CountingIrq();
  const { t, d, same } = paged((isr) => new VirtioMmio(rng(), ram.mem, irq, isr));
  same("at first");
  assert.equal(d.r32(0x000), 0x74726976);
  assert.equal(d.negotiate(F.VERSION_1 | F.EVENT_IDX), true);
  same("after negotiation");
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q);
  d.driverOk();
  same("after DRIVER_OK");
  assert.equal(d.r32(0x044), 1, "QueueReady from the page");
  q.add([{ addr: ram.alloc(64), len: 64, write: true }]);
  d.notify(0);
  assert.equal(d.r32(0x060), 1, "InterruptStatus from the page after a request");
  same("with an interrupt pending");
  d.w32(0x064, 1);
  assert.equal(d.r32(0x060), 0, "InterruptStatus from the page after the ACK");
  d.w32(0x030, 5);
  assert.equal(d.r32(0x034), 0, "QueueNumMax of a missing queue");
  same("after QueueSel 5");
  // The device's side: a config change and a device error, with no driver write after them.
  const gen = d.r32(0x0fc);
  t.core.signalConfig();
  assert.notEqual(d.r32(0x0fc), gen, "ConfigGeneration from the page after a config change");
  same("after a config change");
  t.core.needsReset("test");
  assert.ok(d.status() & STATUS.DEVICE_NEEDS_RESET, "NEEDS_RESET from the page");
  same("after NEEDS_RESET");
  await d.w32(0x070, 0);
  assert.equal(d.status(), 0);
  same("after a reset");
});

Deno.test("register page (v1, legacy): QueuePFN and the rest read the same from the copy", () => {
  const ram = new GuestRam(1 << 20);
  const { d, same } = paged((isr) => new VirtioMmioLegacy(rng(), ram.mem, new CountingIrq(), isr));
  assert.equal(d.r32(0x004), 1);
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  d.w32(0x028, 4096);
  d.w32(0x030, 0);
  d.w32(0x038, 16);
  const ringBase = ram.alloc(3 * 4096, 4096);
  d.w32(0x040, ringBase / 4096);
  assert.equal(d.r32(0x040), ringBase / 4096, "QueuePFN from the page");
  same("with a queue");
  d.w32(0x070, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  same("after DRIVER_OK");
  d.w32(0x070, 0);
  assert.equal(d.r32(0x040), 0, "QueuePFN from the page after a reset");
  same("after a reset");
});

Deno.test("register page: a change of several config words is stored inside hold, before the new ConfigGeneration", () => {
  const ram = new GuestRam();
  const dev = rng();
  let cfg = [1, 1];
  // A device with 8 bytes of config space (two words) that changes.
  dev.readConfig = (o, d) => d.forEach((_, i) => d[i] = o + i < 8 ? cfg[(o + i) >> 2] : 0);
  const words = new Int32Array(new SharedArrayBuffer(4096));
  const t = new VirtioMmio(dev, ram.mem, new CountingIrq(), { array: words, index: 0x060 / 4 });
  const stores: string[] = [];
  const logged = new Proxy(words, {
    set: (w, k, v) => {
      stores.push(`${held ? "held " : ""}0x${(Number(k) * 4).toString(16)}`);
      return Reflect.set(w, k, v);
    },
    get: (w, k) => Reflect.get(w, k),
  });
  let held = false, holds = 0;
  t.keepCopy(logged, 0, (store) => {
    holds++;
    held = true;
    store();
    held = false;
  });
  assert.equal(holds, 0, "the first copy, before the guest runs, needs no hold");
  stores.length = 0;
  cfg = [2, 2];
  t.core.signalConfig();
  assert.equal(holds, 1);
  assert.deepEqual(stores, ["held 0x100", "held 0x104", "0xfc"], "both words held, then ConfigGeneration");
  assert.equal(words[0x104 / 4], 0x02020202);
  stores.length = 0;
  cfg = [2, 3];
  t.core.signalConfig();
  assert.equal(holds, 1, "one word changes at once without a hold");
  assert.deepEqual(stores, ["0x104", "0xfc"]);
});

Deno.test("register page: a config write refreshes the words it covers, not the whole window", async () => {
  const ram = new GuestRam();
  const dev = rng();
  let reads = 0;
  dev.readConfig = (_o, d) => {
    reads++;
    d.fill(0);
  };
  const { d } = paged((isr) => new VirtioMmio(dev, ram.mem, new CountingIrq(), isr));
  reads = 0;
  await d.w32(0x108, 7);
  assert.equal(reads, 1, "one config word read back");
  const d8 = new Uint8Array(8);
  await d.regs.write(0xffc, d8.subarray(0, 4));
  assert.equal(reads, 2);
});
