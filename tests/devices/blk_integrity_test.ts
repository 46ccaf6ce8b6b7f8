/**
 * Data integrity of virtio-blk: a quiet reset, teardown that never outlives its fds,
 * write-through without FLUSH, bounded chains and requests, and the spec's small rules.
 * Driven from the driver side through the harness, on real image files.
 */

import assert from "node:assert/strict";
import { blkVm, MIB, request, type Vm } from "../harness/blk.ts";
import { CountingIrq, DriverQueue, F, GuestRam, MmioDriver } from "../harness/virtio_driver.ts";
import { BLK_F, usedLength, VirtioBlk } from "../../devices/virtio/blk.ts";
import { BLK_S, BLK_T } from "../../devices/virtio/blk_request.ts";
import type { BlockBackend } from "../../devices/virtio/blk_backend.ts";
import { STATUS } from "../../devices/virtio/device.ts";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT } from "../../devices/virtio/chain.ts";
import { FileBackend } from "../../vmm/block_file.ts";
import { parkBlockingPool } from "../harness/blocking_pool.ts";
import { VirtioMmio } from "../../transports/mmio.ts";

const tick = (ms = 5) => new Promise((r) => setTimeout(r, ms));

/** A backend whose reads and writes wait at a gate before doing the real I/O. */
function gated(b: FileBackend): BlockBackend & { open: () => void; waiting: number } {
  let release!: () => void;
  const gate = new Promise<void>((r) => release = r);
  const g = {
    waiting: 0,
    open: () => release(),
    size: b.size,
    readonly: b.readonly,
    identity: b.identity,
    read: async (bufs: Uint8Array[], off: number) => {
      g.waiting++;
      await gate;
      await b.read(bufs, off);
    },
    write: async (bufs: Uint8Array[], off: number) => {
      g.waiting++;
      await gate;
      await b.write(bufs, off);
    },
    flush: () => b.flush(),
    discard: (o: number, l: number) => b.discard(o, l),
    writeZeroes: (o: number, l: number, u: boolean) => b.writeZeroes(o, l, u),
    close: () => b.close(),
  };
  return g;
}

/** Queues an IN of `len` bytes at `sector` without waiting; returns the buffer address. */
function queueRead(vm: Vm, sector: number, len: number): number {
  const hdr = vm.ram.alloc(16);
  const dv = vm.ram.dv(hdr, 16);
  dv.setUint32(0, BLK_T.IN, true);
  dv.setBigUint64(8, BigInt(sector), true);
  const buf = vm.ram.alloc(len, 512);
  const st = vm.ram.alloc(1);
  vm.q.add([{ addr: hdr, len: 16 }, { addr: buf, len, write: true }, { addr: st, len: 1, write: true }]);
  return buf;
}

Deno.test("blk integrity: after the driver sees Status 0, no guest byte changes (reset with reads in flight)", async () => {
  let gate!: ReturnType<typeof gated>;
  const vm = await blkVm({ wrap: (b) => gate = gated(b) });
  queueRead(vm, 3, 32 * 1024);
  queueRead(vm, 100, 4096);
  vm.d.notify(0);
  assert.equal(gate.waiting, 2, "both reads started");
  const resetDone = vm.d.w32(0x070, 0);
  assert.ok(resetDone instanceof Promise, "the reset waits for the reads in flight");
  assert.notEqual(vm.d.status(), 0, "Status does not read 0 while guest buffers may still change");
  let settled = false;
  void resetDone.then(() => settled = true);
  await tick(20);
  assert.equal(settled, false, "not answered before the I/O finished");
  gate.open();
  await resetDone;
  assert.equal(vm.d.status(), 0);
  const snapshot = vm.ram.bytes.slice();
  await tick(50);
  assert.deepEqual(vm.ram.bytes, snapshot, "guest memory changed after the reset completed");
  assert.equal(vm.q.usedIdx(), 0, "no used entry written after the reset");
  assert.equal(vm.dev.pending, 0);
  await vm.close();
});

Deno.test("blk integrity: a reset with nothing in flight completes at once", async () => {
  const vm = await blkVm();
  assert.equal((await request(vm, BLK_T.IN, 1, { len: 512, write: true })).status, BLK_S.OK);
  assert.equal(vm.d.w32(0x070, 0), undefined);
  assert.equal(vm.d.status(), 0);
  await vm.close();
});

Deno.test("blk integrity: closing an image waits for queued writes; a file opened meanwhile never gets them", async () => {
  // Fill Deno's blocking pool with reads parked on an empty pipe, so the disk writes queue.
  const pathA = await Deno.makeTempFile(), pathB = await Deno.makeTempFile();
  await Deno.writeFile(pathA, new Uint8Array(64 * 1024));
  await Deno.writeFile(pathB, new Uint8Array(64 * 1024));
  const pool = parkBlockingPool();
  const a = FileBackend.open(pathA, false, { nowait: false }); // every write through the pool
  const data = new Uint8Array(4096).fill(0x77);
  const writes = [];
  for (let i = 0; i < 8; i++) writes.push(a.write([data], i * 4096));
  const closed = a.close();
  // The VMM opens the next image (or anything else) while the old writes still wait.
  const b = FileBackend.open(pathB, false);
  await pool.release();
  await Promise.all(writes);
  await closed;
  await b.close();
  const imgA = await Deno.readFile(pathA), imgB = await Deno.readFile(pathB);
  await Deno.remove(pathA);
  await Deno.remove(pathB);
  assert.ok(
    imgB.every((v) => v === 0),
    "a write meant for the closed image reached the file opened after it",
  );
  assert.ok(imgA.subarray(0, 8 * 4096).every((v) => v === 0x77), "the writes reached their own image");
  await assert.rejects(() => a.read([new Uint8Array(512)], 0), /closed/);
});

Deno.test("blk integrity: without FLUSH negotiated each write is durable before it completes", async () => {
  const noFlush = await blkVm({ features: (all) => all & ~(1n << BLK_F.FLUSH) });
  for (let i = 0; i < 3; i++) {
    const before = noFlush.backend.syncs;
    const r = await request(noFlush, BLK_T.OUT, 10 + i, { len: 512, bytes: new Uint8Array(512).fill(i + 1) });
    assert.equal(r.status, BLK_S.OK);
    assert.equal(noFlush.backend.syncs, before + 1, `write ${i} completed without fdatasync`);
  }
  await noFlush.close();
  const withFlush = await blkVm();
  await request(withFlush, BLK_T.OUT, 10, { len: 512, bytes: new Uint8Array(512).fill(9) });
  assert.equal(withFlush.backend.syncs, 0, "with FLUSH negotiated the driver decides when to sync");
  assert.equal((await request(withFlush, BLK_T.FLUSH, 0, { len: 0 })).status, BLK_S.OK);
  assert.equal(withFlush.backend.syncs, 1);
  await withFlush.close();
});

Deno.test("blk integrity: a 256 MiB indirect table is refused with NEEDS_RESET without being read", () => {
  const dev = new VirtioBlk({
    size: MIB,
    readonly: false,
    identity: "fake",
    read: () => Promise.reject(new Error("unexpected")),
    write: () => Promise.reject(new Error("unexpected")),
    flush: () => Promise.resolve(),
    discard: () => Promise.resolve(),
    writeZeroes: () => Promise.resolve(),
    close: () => Promise.resolve(),
  });
  const TABLE = 256 * MIB;
  const ram = new GuestRam(TABLE + 4 * MIB);
  const d = new MmioDriver(new VirtioMmio(dev, ram.mem, new CountingIrq()));
  d.negotiate(F.VERSION_1 | F.INDIRECT);
  const q = new DriverQueue(ram, 16);
  d.setupQueue(0, q);
  d.driverOk();
  // A table that chains all of its 16M descriptors, each a 1-byte readable buffer: walking
  // it would take seconds and gigabytes.
  const table = ram.alloc(TABLE, 16);
  const words = new BigUint64Array(ram.bytes.buffer, table - ram.base, TABLE / 8);
  const n = TABLE / 16;
  for (let i = 0; i < n; i++) {
    words[2 * i] = BigInt(ram.base + 0x100);
    words[2 * i + 1] = 1n | (BigInt(VIRTQ_DESC_F_NEXT) << 32n) | (BigInt((i + 1) % n) << 48n);
  }
  const rss = Deno.memoryUsage().rss;
  q.setDesc(0, table, TABLE, VIRTQ_DESC_F_INDIRECT, 0);
  q.publish(0);
  d.notify(0);
  assert.ok(d.status() & STATUS.DEVICE_NEEDS_RESET, "NEEDS_RESET");
  const grew = Deno.memoryUsage().rss - rss;
  assert.ok(grew < 32 * MIB, `RSS grew by ${grew} bytes`);
});

Deno.test("blk integrity: requests beyond seg_max or size_max get IOERR and touch nothing", async () => {
  const vm = await blkVm({ size: 4 * MIB, queueSize: 256 });
  // One 2 MiB segment is over size_max (1 MiB).
  const big = await request(vm, BLK_T.IN, 0, { len: 2 * MIB, write: true });
  assert.equal(big.status, BLK_S.IOERR);
  assert.equal(big.len, 0, "nothing written before the status byte");
  // An IN of 255 data segments, the status byte sharing the last one: 256 descriptors, as
  // many as the queue holds, but one segment more than seg_max (254).
  const hdr = vm.ram.alloc(16);
  vm.ram.dv(hdr, 16).setUint32(0, BLK_T.IN, true);
  const data = vm.ram.alloc(255 * 512 + 1, 512);
  const bufs: Array<{ addr: number; len: number; write?: boolean }> = [{ addr: hdr, len: 16 }];
  for (let i = 0; i < 255; i++) bufs.push({ addr: data + 512 * i, len: i === 254 ? 513 : 512, write: true });
  vm.ram.view(data, 255 * 512 + 1).fill(0xcc);
  vm.q.add(bufs, { indirect: true });
  vm.d.notify(0);
  let used: Array<[number, number]> = [];
  for (let i = 0; i < 200 && used.length === 0; i++) {
    await tick(2);
    used = vm.q.takeUsed();
  }
  assert.equal(used.length, 1, "answered");
  assert.equal(vm.d.status() & STATUS.DEVICE_NEEDS_RESET, 0, "a request error, not a ring error");
  assert.equal(vm.ram.view(data + 255 * 512, 1)[0], BLK_S.IOERR, "255 segments with seg_max 254");
  assert.ok(vm.ram.view(data, 255 * 512).every((v) => v === 0xcc), "no data read into the buffers");
  await vm.close();
});

Deno.test("blk integrity: legacy FLUSH_OUT is a flush; DISCARD and WRITE_ZEROES of 0 sectors both succeed", async () => {
  const vm = await blkVm();
  assert.equal((await request(vm, BLK_T.FLUSH_OUT, 0, { len: 0 })).status, BLK_S.OK);
  assert.equal(vm.backend.syncs, 1, "FLUSH_OUT synced");
  const seg = new Uint8Array(16);
  new DataView(seg.buffer).setBigUint64(0, 8n, true); // sector 8, 0 sectors
  assert.equal((await request(vm, BLK_T.DISCARD, 0, { len: 16, bytes: seg })).status, BLK_S.OK);
  assert.equal((await request(vm, BLK_T.WRITE_ZEROES, 0, { len: 16, bytes: seg })).status, BLK_S.OK);
  const img = await Deno.readFile(vm.path);
  assert.equal(img[8 * 512], 8, "nothing zeroed");
  await vm.close();
});

Deno.test("blk integrity: used.len counts only bytes written from the start of the writable part", async () => {
  const vm = await blkVm();
  const id = await request(vm, BLK_T.GET_ID, 0, { len: 30, write: true });
  assert.deepEqual([id.status, id.len], [BLK_S.OK, 20], "GET_ID into 30 bytes writes 20, then a gap");
  const id20 = await request(vm, BLK_T.GET_ID, 0, { len: 20, write: true });
  assert.equal(id20.len, 21, "GET_ID into exactly 20 bytes runs into the status byte");
  const bad = await request(vm, BLK_T.IN, 2047, { len: 1024, write: true });
  assert.deepEqual([bad.status, bad.len], [BLK_S.IOERR, 0], "a failed IN wrote no data");
  const ok = await request(vm, BLK_T.IN, 0, { len: 1024, write: true });
  assert.equal(ok.len, 1025);
  const w = await request(vm, BLK_T.OUT, 5, { len: 512, bytes: new Uint8Array(512) });
  assert.equal(w.len, 1, "an OUT writes the status byte only");
  // The rule itself, for a request whose writable part holds more than the status byte.
  const req = { type: BLK_T.OUT, sector: 0, data: [], dataLen: 0, status: new Uint8Array(1), writableLen: 9 };
  assert.equal(usedLength(req, BLK_S.OK), 0);
  await vm.close();
});

Deno.test("blk integrity: a write-through write that the backend fails is IOERR, and the device goes on", async () => {
  const vm = await blkVm({
    features: (all) => all & ~(1n << BLK_F.FLUSH),
    wrap: (b) => ({
      size: b.size,
      readonly: false,
      identity: b.identity,
      read: (x, o) => b.read(x, o),
      write: (x, o) => b.write(x, o),
      flush: () => Promise.reject(new Error("disk full")),
      discard: (o, l) => b.discard(o, l),
      writeZeroes: (o, l, u) => b.writeZeroes(o, l, u),
      close: () => b.close(),
    }),
  });
  assert.equal(
    (await request(vm, BLK_T.OUT, 1, { len: 512, bytes: new Uint8Array(512) })).status,
    BLK_S.IOERR,
  );
  assert.equal((await request(vm, BLK_T.IN, 1, { len: 512, write: true })).status, BLK_S.OK);
  await vm.close();
});
