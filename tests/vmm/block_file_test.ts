/**
 * The file backend's buffers stay alive while Deno's blocking pool holds a call that
 * points at them (vmm/sys/libc.ts pinnedCall). The probe runs in its own process with
 * `--expose-gc`; see iovec_gc_probe.ts for what it does.
 */

import assert from "node:assert/strict";
import { FileBackend } from "../../vmm/block_file.ts";
import { EventLoop } from "../../vmm/event_loop.ts";
import { ioUringForbidden } from "../harness/io_uring_host.ts";

Deno.test("block file: iovecs of queued preadv/pwritev survive a GC (warmed up, blocking pool full)", async () => {
  const probe = new URL("./iovec_gc_probe.ts", import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--expose-gc", probe, "600", "50000"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.ok(out.success && /iovec-probe ok/.test(text), `probe failed (exit ${out.code}):\n${text}`);
});

Deno.test("block file: a read the page cache holds completes without the blocking pool (RWF_NOWAIT)", async () => {
  const path = await Deno.makeTempFile();
  const data = Uint8Array.from({ length: 65536 }, (_, i) => (i * 13) & 0xff);
  await Deno.writeFile(path, data);
  const f = FileBackend.open(path, true);
  const copy = await Deno.makeTempFile();
  await Deno.copyFile(path, copy);
  const pool = FileBackend.open(copy, true, { nowait: false });
  try {
    // Warm the cache, then read through both paths: the same bytes, only one skips the pool.
    await Deno.readFile(path);
    await Deno.readFile(copy);
    const a = new Uint8Array(8192), b = new Uint8Array(8192);
    await f.read([a.subarray(0, 100), a.subarray(100)], 4096);
    await pool.read([b.subarray(0, 5000), b.subarray(5000)], 4096);
    assert.deepEqual(a, data.subarray(4096, 4096 + 8192));
    assert.deepEqual(b, a);
    assert.equal(f.nowaitHits, 1, "the cached read was done at once");
    assert.equal(pool.nowaitHits, 0);
  } finally {
    await f.close();
    await pool.close();
    await Deno.remove(path);
    await Deno.remove(copy);
  }
});

Deno.test("block file: an image on tmpfs is read, written and synced at once, never through the pool", async () => {
  const path = await Deno.makeTempFile({ dir: "/dev/shm" });
  await Deno.writeFile(path, new Uint8Array(65536));
  const f = FileBackend.open(path, false);
  try {
    const data = Uint8Array.from({ length: 6000 }, (_, i) => (i * 7) & 0xff);
    await f.write([data.subarray(0, 1000), data.subarray(1000)], 512);
    await f.flush();
    const back = new Uint8Array(6000);
    await f.read([back.subarray(0, 3000), back.subarray(3000)], 512);
    assert.deepEqual(back, data);
    assert.match(f.describe(), /at_once=2 uring=0 pool=0 memory_fs=true/);
    // A transfer over 1 MiB is one copy too many for the device thread: the pool takes it.
    const big = new Uint8Array((1 << 20) + 4096);
    await Deno.truncate(path, big.length + 4096);
    await f.read([big], 0);
    assert.match(f.describe(), /pool=1 /);
  } finally {
    await f.close();
    await Deno.remove(path);
  }
});

/** Open fds of this process (to see a ring and its eventfd closed). */
function openFds(): number {
  return [...Deno.readDirSync("/proc/self/fd")].length;
}

Deno.test("block file: attached to a loop, what cannot be made at once goes to an io_uring, not the pool", async () => {
  const path = await Deno.makeTempFile();
  const data = Uint8Array.from({ length: 20000 }, (_, i) => (i * 11 + 3) & 0xff);
  await Deno.writeFile(path, new Uint8Array(65536));
  const fdsBefore = openFds();
  const loop = new EventLoop();
  loop.start();
  const f = FileBackend.open(path, false, { nowait: false }); // no transfer made at once
  try {
    f.attach(loop);
    // Where the host forbids io_uring the pool takes the same transfers (and the report says why).
    const forbidden = ioUringForbidden();
    assert.match(f.describe(), forbidden ? /io_uring=refused\(/ : /io_uring=on/);
    // Segments of odd sizes, several requests in flight at once, a flush among them.
    const writes = [0, 1, 2, 3].map((k) =>
      f.write(
        [data.subarray(k * 5000, k * 5000 + 1000), data.subarray(k * 5000 + 1000, (k + 1) * 5000)],
        512 + k * 5000,
      )
    );
    await Promise.all([...writes, f.flush()]);
    assert.deepEqual(
      (await Deno.readFile(path)).subarray(512, 512 + 20000),
      data,
      "the writes are in the file",
    );
    const back = new Uint8Array(20000);
    await Promise.all(
      [0, 1].map((k) => f.read([back.subarray(k * 10000, (k + 1) * 10000)], 512 + k * 10000)),
    );
    assert.deepEqual(back, data);
    // Past the end: a short read goes on where it stopped, and what is not there reads as zeros.
    const tail = new Uint8Array(8192).fill(0xee);
    await f.read([tail], 65536 - 4096);
    assert.deepEqual(tail.subarray(4096), new Uint8Array(4096));
    assert.match(
      f.describe(),
      forbidden ? /at_once=0 uring=0 pool=8 / : /at_once=0 uring=9 pool=0 /,
      "4 writes, the flush, 2 reads, the tail read twice (the pool does not count the flush)",
    );
  } finally {
    await f.close();
    await loop.stop();
    await Deno.remove(path);
  }
  assert.equal(openFds(), fdsBefore, "the ring, its eventfd, the image and the loop are closed");
});

Deno.test("block file: with TSVMM_IO_URING=0 the blocking pool stays", async () => {
  const path = await Deno.makeTempFile();
  await Deno.writeFile(path, new Uint8Array(8192).fill(7));
  const loop = new EventLoop();
  loop.start();
  const f = FileBackend.open(path, false, { nowait: false });
  Deno.env.set("TSVMM_IO_URING", "0");
  try {
    f.attach(loop);
    const b = new Uint8Array(4096);
    await f.read([b], 4096);
    assert.deepEqual(b, new Uint8Array(4096).fill(7));
    assert.match(f.describe(), /uring=0 pool=1 .* io_uring=off/);
  } finally {
    Deno.env.delete("TSVMM_IO_URING");
    await f.close();
    await loop.stop();
    await Deno.remove(path);
  }
});

Deno.test("block file: with a ring, a transfer that was not made at once is not tried at once a second time", async () => {
  const path = await Deno.makeTempFile();
  await Deno.writeFile(path, new Uint8Array(8192).fill(5));
  await Deno.readFile(path); // cached: RWF_NOWAIT would serve it
  const loop = new EventLoop();
  loop.start();
  const f = FileBackend.open(path, true);
  try {
    f.attach(loop);
    const b = new Uint8Array(4096);
    // `read` is the way of what `transferNow` did not make at once; the ring tries without
    // waiting itself. On tmpfs (or with no ring) the plain call at once is the way.
    await f.read([b], 4096);
    assert.deepEqual(b, new Uint8Array(4096).fill(5));
    const r = f.describe();
    if (/memory_fs=true/.test(r) || ioUringForbidden()) assert.match(r, /at_once=1 uring=0 /, r);
    else assert.match(r, /at_once=0 uring=1 pool=0 /, r);
  } finally {
    await f.close();
    await loop.stop();
    await Deno.remove(path);
  }
});
