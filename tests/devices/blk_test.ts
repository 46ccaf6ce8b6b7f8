/**
 * virtio-blk through the modern MMIO transport on a real image file (the VMM's file
 * backend, no KVM), driven from the driver side.
 */

import assert from "node:assert/strict";
import { blkVm, MIB, request } from "../harness/blk.ts";
import { BLK_F, derivedSerial } from "../../devices/virtio/blk.ts";
import { BLK_S, BLK_T } from "../../devices/virtio/blk_request.ts";
import { FileBackend } from "../../vmm/block_file.ts";
import { STATUS } from "../../devices/virtio/device.ts";

Deno.test("blk: config space has capacity, blk_size, seg_max, size_max; features per mode", async () => {
  const vm = await blkVm({ size: 2 * MIB });
  const cfg = new Uint8Array(60);
  vm.dev.readConfig(0, cfg);
  const dv = new DataView(cfg.buffer);
  assert.equal(dv.getBigUint64(0, true), BigInt(2 * MIB / 512));
  assert.equal(dv.getUint32(20, true), 512);
  assert.equal(dv.getUint32(12, true), 254);
  assert.ok(dv.getUint32(8, true) >= 4096);
  const f = vm.dev.features;
  assert.ok(f & (1n << BLK_F.FLUSH) && f & (1n << BLK_F.DISCARD) && f & (1n << BLK_F.WRITE_ZEROES));
  assert.equal(f & (1n << BLK_F.RO), 0n);
  // A 4-byte config read through the transport at 0x100 + 20.
  assert.equal(vm.d.r32(0x100 + 20), 512);
  await vm.close();
});

Deno.test("blk: IN reads the image, OUT writes it, FLUSH succeeds", async () => {
  const vm = await blkVm();
  const r = await request(vm, BLK_T.IN, 3, { len: 1024, write: true });
  assert.equal(r.status, BLK_S.OK);
  assert.equal(r.len, 1025);
  assert.equal(vm.ram.view(r.buf, 1)[0], 3);
  assert.equal(vm.ram.view(r.buf + 512, 1)[0], 4);
  const pattern = new TextEncoder().encode("written by the guest".padEnd(512, "."));
  const w = await request(vm, BLK_T.OUT, 10, { len: 512, bytes: pattern });
  assert.deepEqual([w.status, w.len], [BLK_S.OK, 1]);
  assert.equal((await request(vm, BLK_T.FLUSH, 0, { len: 0 })).status, BLK_S.OK);
  const img = await Deno.readFile(vm.path);
  assert.deepEqual(img.subarray(10 * 512, 11 * 512), pattern);
  assert.equal(vm.irq.count, 1, "interrupted once (EVENT_IDX: used_event stays 0)");
  await vm.close();
});

Deno.test("blk: GET_ID returns the configured serial, or a derived one that is never all zero", async () => {
  const a = await blkVm({ serial: "disk-one" });
  const r = await request(a, BLK_T.GET_ID, 0, { len: 20, write: true });
  assert.equal(r.status, BLK_S.OK);
  assert.equal(new TextDecoder().decode(a.ram.view(r.buf, 8)), "disk-one");
  await a.close();
  const b = await blkVm();
  const r2 = await request(b, BLK_T.GET_ID, 0, { len: 20, write: true });
  const id = new TextDecoder().decode(b.ram.view(r2.buf, 20));
  assert.equal(id, derivedSerial(await Deno.realPath(b.path)));
  assert.match(id, /^tsvmm-[0-9a-f]{14}$/);
  await b.close();
});

Deno.test("blk: DISCARD and WRITE_ZEROES leave zeros", async () => {
  const vm = await blkVm();
  const seg = (sector: number, n: number, flags = 0) => {
    const b = new Uint8Array(16);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, BigInt(sector), true);
    dv.setUint32(8, n, true);
    dv.setUint32(12, flags, true);
    return b;
  };
  assert.equal((await request(vm, BLK_T.DISCARD, 0, { len: 16, bytes: seg(8, 8) })).status, BLK_S.OK);
  assert.equal((await request(vm, BLK_T.WRITE_ZEROES, 0, { len: 16, bytes: seg(100, 4) })).status, BLK_S.OK);
  assert.equal(
    (await request(vm, BLK_T.WRITE_ZEROES, 0, { len: 16, bytes: seg(200, 4, 1) })).status,
    BLK_S.OK,
  );
  const img = await Deno.readFile(vm.path);
  for (const s of [8, 15, 100, 103, 200, 203]) assert.equal(img[s * 512], 0, `sector ${s}`);
  assert.equal(img[16 * 512], 16, "sector after the discarded range untouched");
  assert.equal(img.length, MIB, "size kept");
  await vm.close();
});

Deno.test("blk: out-of-range, unaligned and unknown requests get IOERR/UNSUPP", async () => {
  const vm = await blkVm();
  assert.equal((await request(vm, BLK_T.IN, 2047, { len: 1024, write: true })).status, BLK_S.IOERR);
  assert.equal((await request(vm, BLK_T.IN, 2 ** 60, { len: 512, write: true })).status, BLK_S.IOERR);
  assert.equal((await request(vm, BLK_T.OUT, 0, { len: 100 })).status, BLK_S.IOERR);
  assert.equal((await request(vm, 99, 0, { len: 0 })).status, BLK_S.UNSUPP);
  await vm.close();
});

Deno.test("blk: a readonly disk offers RO and answers writes with IOERR; the image is unchanged", async () => {
  const vm = await blkVm({ readonly: true });
  assert.ok(vm.dev.features & (1n << BLK_F.RO));
  const before = await Deno.readFile(vm.path);
  assert.equal(
    (await request(vm, BLK_T.OUT, 0, { len: 512, bytes: new Uint8Array(512).fill(1) })).status,
    BLK_S.IOERR,
  );
  assert.equal((await request(vm, BLK_T.IN, 1, { len: 512, write: true })).status, BLK_S.OK);
  assert.deepEqual(await Deno.readFile(vm.path), before);
  await vm.close();
});

Deno.test("blk: a request without a status byte sets NEEDS_RESET", async () => {
  const vm = await blkVm();
  const hdr = vm.ram.alloc(16);
  vm.q.add([{ addr: hdr, len: 16 }]);
  vm.d.notify(0);
  assert.ok(vm.d.status() & STATUS.DEVICE_NEEDS_RESET);
  await vm.close();
});

Deno.test("blk: a locked image is refused", async () => {
  const vm = await blkVm();
  assert.throws(() => FileBackend.open(vm.path, false), /locked by another process/);
  await vm.close();
});

/** Posts a read of `sectors` at `sector` (header, data, status); returns the data and status addresses. */
function postRead(vm: Awaited<ReturnType<typeof blkVm>>, sector: number, sectors = 1) {
  const hdr = vm.ram.alloc(16);
  const dv = vm.ram.dv(hdr, 16);
  dv.setUint32(0, BLK_T.IN, true);
  dv.setBigUint64(8, BigInt(sector), true);
  const buf = vm.ram.alloc(512 * sectors, 512);
  const status = vm.ram.alloc(1);
  vm.ram.view(status, 1)[0] = 0xee;
  vm.q.add([{ addr: hdr, len: 16 }, { addr: buf, len: 512 * sectors, write: true }, {
    addr: status,
    len: 1,
    write: true,
  }]);
  return { buf, status };
}

Deno.test("blk: reads the page cache or a memory file system holds complete within the doorbell, one interrupt for a batch", async () => {
  for (const dir of [undefined, "/dev/shm"]) {
    const vm = await blkVm({ size: MIB, dir });
    try {
      await Deno.readFile(vm.path); // in the page cache
      const reqs = [3, 70, 1000, 5].map((s) => ({ s, ...postRead(vm, s) }));
      const before = vm.irq.count;
      vm.d.notify(0);
      // Nothing awaited since the doorbell: the answers are already in the used ring.
      const used = vm.q.takeUsed();
      assert.equal(used.length, reqs.length, `${dir ?? "the temp dir"}: completed within the doorbell`);
      assert.equal(vm.dev.pending, 0);
      assert.equal(vm.irq.count - before, 1, "one interrupt for the four");
      for (const r of reqs) {
        assert.equal(vm.ram.view(r.status, 1)[0], BLK_S.OK);
        assert.equal(vm.ram.view(r.buf, 1)[0], r.s & 0xff, `sector ${r.s} starts with its number`);
      }
      assert.match(vm.backend.describe(), /at_once=4 uring=0 pool=0/);
    } finally {
      await vm.close();
    }
  }
});

Deno.test("blk: a read beyond the end of an image that shrank while open is zeros and OK", async () => {
  const vm = await blkVm({ size: MIB });
  try {
    await Deno.truncate(vm.path, 4096); // sectors 0-7 remain
    const a = postRead(vm, 6, 4); // half in the file, half past its end
    vm.ram.view(a.buf, 2048).fill(0x77);
    vm.d.notify(0);
    for (let i = 0; i < 500 && vm.ram.view(a.status, 1)[0] === 0xee; i++) {
      await new Promise((r) => setTimeout(r, 2));
    }
    assert.equal(vm.ram.view(a.status, 1)[0], BLK_S.OK);
    const got = vm.ram.view(a.buf, 2048);
    assert.deepEqual([got[0], got[512]], [6, 7]);
    assert.ok(got.subarray(1024).every((b) => b === 0), "past the end reads as zeros");
  } finally {
    await vm.close();
  }
});

Deno.test("blk: a broken chain after a request completed at once: NEEDS_RESET, and no used-ring interrupt after it", async () => {
  const vm = await blkVm();
  try {
    await Deno.readFile(vm.path); // in the page cache: the read completes at once
    postRead(vm, 3);
    vm.q.add([{ addr: vm.ram.alloc(16), len: 16 }]); // no status byte
    vm.d.notify(0);
    assert.ok(vm.d.status() & STATUS.DEVICE_NEEDS_RESET);
    assert.match(vm.backend.describe(), /at_once=1 /);
    // InterruptStatus: the configuration change that reports NEEDS_RESET, not a used buffer.
    assert.equal(vm.d.r32(0x60), 2);
  } finally {
    await vm.close();
  }
});
