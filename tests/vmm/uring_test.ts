/**
 * The io_uring driver (vmm/sys/uring.ts) on its own: transfers and syncs complete through
 * the eventfd an epoll loop watches, a full ring says so instead of queueing, errors come
 * back as negative errno values, and closing waits for what is in flight.
 */

import assert from "node:assert/strict";
import { RING_REFUSED, Uring } from "../../vmm/sys/uring.ts";
import { Iovecs } from "../../vmm/sys/iovec.ts";
import { EventLoop } from "../../vmm/event_loop.ts";
import { sysClose, sysOpen } from "../../vmm/sys/libc.ts";
import { ioUringForbidden } from "../harness/io_uring_host.ts";

const O_RDWR = 2;
const EBADF = 9;

/** An iovec array over `bufs`, with its entry count. */
function iovOf(bufs: Uint8Array[]): { iov: Iovecs; count: number } {
  const iov = new Iovecs(bufs.length);
  return { iov, count: iov.fill(bufs) };
}

const forbidden = ioUringForbidden();

if (forbidden) {
  Deno.test(`io_uring: where this host forbids it (${forbidden}), open says why instead of failing later`, () => {
    const why: { reason?: string } = {};
    assert.equal(Uring.open(4, why), undefined);
    assert.match(why.reason ?? "", /io_uring_setup failed/);
  });
}

Deno.test({
  ignore: forbidden !== undefined,
  name: "io_uring: writes, a sync and reads complete through the loop; a full ring and a bad fd say so",
  fn: async () => {
    const path = await Deno.makeTempFile();
    await Deno.writeFile(path, new Uint8Array(1 << 16));
    const fd = sysOpen(path, O_RDWR);
    const loop = new EventLoop();
    loop.start();
    const why: { reason?: string } = {};
    const ring = Uring.open(4, why);
    assert.ok(ring, `io_uring refused on this host: ${why.reason}`);
    const unwatch = loop.add(ring.eventFd, () => ring.reap(), { edge: true });
    try {
      assert.equal(ring.entries, 4);
      const data = Uint8Array.from({ length: 4 * 4096 }, (_, i) => (i * 5 + 1) & 0xff);
      const writes = [0, 1, 2, 3].map((k) => {
        const { iov, count } = iovOf([
          data.subarray(k * 4096, k * 4096 + 100),
          data.subarray(k * 4096 + 100, (k + 1) * 4096),
        ]);
        return ring.vectored(true, fd, iov, count, k * 4096, [data]);
      });
      assert.ok(writes.every((p) => p !== undefined), "four fit");
      assert.equal(ring.inFlight, 4);
      assert.equal(ring.hasRoom, false);
      assert.equal(ring.datasync(fd), undefined, "a fifth does not: the caller takes another way");
      assert.deepEqual(await Promise.all(writes), [4096, 4096, 4096, 4096]);
      assert.equal(await ring.datasync(fd), 0);
      assert.deepEqual((await Deno.readFile(path)).subarray(0, data.length), data);
      // A read past the end is short, as preadv's would be.
      const back = new Uint8Array(8192);
      const { iov, count } = iovOf([back]);
      assert.equal(await ring.vectored(false, fd, iov, count, (1 << 16) - 4096, [back]), 4096);
      const r2 = iovOf([back]);
      assert.equal(await ring.vectored(false, fd, r2.iov, r2.count, 0, [back]), 8192);
      assert.deepEqual(back, data.subarray(0, 8192));
      const bad = iovOf([back]);
      assert.equal(await ring.vectored(false, 100000, bad.iov, bad.count, 0, [back]), -EBADF);
      // Punch a hole (reads back zeros) and zero a range, as virtio-blk's DISCARD and WRITE_ZEROES do.
      const PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01, ZERO_RANGE_KEEP_SIZE = 0x10 | 0x01;
      assert.equal(await ring.fallocate(fd, PUNCH_HOLE_KEEP_SIZE, 4096, 4096), 0);
      assert.equal(await ring.fallocate(fd, ZERO_RANGE_KEEP_SIZE, 12288, 4096), 0);
      const img = await Deno.readFile(path);
      assert.equal(img.length, 1 << 16, "the size is kept");
      assert.deepEqual(img.subarray(4096, 8192), new Uint8Array(4096));
      assert.deepEqual(img.subarray(12288, 16384), new Uint8Array(4096));
      assert.deepEqual(
        img.subarray(8192, 12288),
        data.subarray(8192, 12288),
        "the range between is untouched",
      );
      assert.equal(ring.completed, 10);
      assert.equal(ring.inFlight, 0);
    } finally {
      unwatch();
      ring.close();
      await loop.stop();
      sysClose(fd);
      await Deno.remove(path);
    }
  },
});

Deno.test({
  ignore: forbidden !== undefined,
  name: "io_uring: close waits for the operations in flight and settles them, with no loop",
  fn: async () => {
    const path = await Deno.makeTempFile();
    await Deno.writeFile(path, new Uint8Array(1 << 20).fill(9));
    const fd = sysOpen(path, O_RDWR);
    const ring = Uring.open(8)!;
    const bufs = [0, 1, 2, 3].map(() => new Uint8Array(1 << 18));
    const reads = bufs.map((b, k) => {
      const { iov, count } = iovOf([b]);
      return ring.vectored(false, fd, iov, count, k << 18, [b])!;
    });
    ring.close();
    assert.deepEqual(await Promise.all(reads), [1 << 18, 1 << 18, 1 << 18, 1 << 18]);
    assert.ok(bufs.every((b) => b.every((x) => x === 9)));
    assert.equal(ring.hasRoom, false, "a closed ring takes nothing more");
    sysClose(fd);
    await Deno.remove(path);
  },
});

Deno.test({
  ignore: forbidden !== undefined,
  name: "io_uring: buffers of writes the kernel carries out later survive a GC (the ring holds them)",
  fn: async () => {
    const probe = new URL("./uring_gc_probe.ts", import.meta.url).pathname;
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--v8-flags=--expose-gc", probe],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.ok(out.success && /uring-probe ok/.test(text), `probe failed (exit ${out.code}):\n${text}`);
  },
});

Deno.test({
  ignore: forbidden !== undefined,
  name:
    "io_uring: a deferred ring hands what was queued to the kernel in one enter, at flush or after the job",
  fn: async () => {
    const path = await Deno.makeTempFile();
    const data = Uint8Array.from({ length: 1 << 16 }, (_, i) => (i * 11 + 3) & 0xff);
    await Deno.writeFile(path, data);
    const fd = sysOpen(path, O_RDWR);
    const ring = Uring.open(8)!;
    ring.deferred = true;
    try {
      const read = (k: number) => {
        const b = new Uint8Array(4096);
        const { iov, count } = iovOf([b]);
        return ring.vectored(false, fd, iov, count, k * 4096, [b])!.then((n) => ({ n, b, k }));
      };
      const four = [0, 1, 2, 3].map(read);
      assert.equal(ring.enters, 0, "queued, not yet submitted");
      assert.equal(ring.flush(), false, "nothing refused");
      assert.equal(ring.enters, 1, "four operations, one enter");
      ring.drain();
      for (const { n, b, k } of await Promise.all(four)) {
        assert.equal(n, 4096);
        assert.deepEqual(b, data.subarray(k * 4096, (k + 1) * 4096));
      }
      // Nobody flushes: the ring does once the queuing job is done, so a wait cannot hang.
      const two = [4, 5].map(read);
      assert.equal(ring.enters, 1);
      await null;
      assert.equal(ring.enters, 2, "submitted after the job that queued them");
      ring.drain();
      assert.deepEqual((await Promise.all(two)).map(({ n }) => n), [4096, 4096]);
    } finally {
      ring.close();
      sysClose(fd);
      await Deno.remove(path);
    }
  },
});

Deno.test({
  ignore: forbidden !== undefined,
  name:
    "io_uring: operations the kernel does not take at flush resolve as refused, and the ring takes no more",
  fn: async () => {
    const path = await Deno.makeTempFile();
    await Deno.writeFile(path, new Uint8Array(8192));
    const fd = sysOpen(path, O_RDWR);
    const ring = Uring.open(8)!;
    ring.deferred = true;
    // The ring's fd number now names /dev/null, whose io_uring_enter fails: nothing is taken.
    const libc = Deno.dlopen("libc.so.6", { dup2: { parameters: ["i32", "i32"], result: "i32" } });
    const ringFd = (ring as unknown as { fd: number }).fd;
    const devNull = sysOpen("/dev/null", O_RDWR);
    try {
      const b = new Uint8Array(4096);
      const { iov, count } = iovOf([b]);
      const p = ring.vectored(false, fd, iov, count, 0, [b])!;
      assert.equal(libc.symbols.dup2(devNull, ringFd), ringFd);
      assert.equal(ring.flush(), true, "refused: the caller's continuations make the call another way");
      assert.equal(await p, RING_REFUSED);
      assert.equal(ring.isClosed, true);
      assert.equal(ring.hasRoom, false);
      assert.equal(ring.inFlight, 0);
    } finally {
      ring.close(); // closes the /dev/null duplicate and unmaps the rings
      sysClose(devNull);
      libc.close();
      sysClose(fd);
      await Deno.remove(path);
    }
  },
});

Deno.test({
  ignore: forbidden !== undefined,
  name:
    "io_uring: an entry that fails as it is submitted gets its error; the rest of its batch is submitted and the ring stays on",
  fn: async () => {
    const path = await Deno.makeTempFile();
    const data = Uint8Array.from({ length: 3 * 4096 }, (_, i) => (i * 7 + 1) & 0xff);
    await Deno.writeFile(path, data);
    const fd = sysOpen(path, O_RDWR);
    const ring = Uring.open(8)!;
    ring.deferred = true;
    try {
      const read = (k: number, count?: number) => {
        const b = new Uint8Array(4096);
        const iov = iovOf([b]);
        return ring.vectored(false, fd, iov.iov, count ?? iov.count, k * 4096, [b])!.then((n) => ({ n, b }));
      };
      // More iovec entries than a readv may have (UIO_MAXIOV, 1024): kernels that check it as
      // the entry is submitted (6.10 and later) end the batch there, with the entry's error
      // posted, and leave the third read in the submission ring.
      const batch = [read(0), read(1, 2000), read(2)];
      assert.equal(ring.flush(), false, "nothing refused");
      ring.drain();
      const [a, bad, c] = await Promise.all(batch);
      assert.equal(a.n, 4096);
      assert.deepEqual(a.b, data.subarray(0, 4096));
      assert.equal(bad.n, -22, "EINVAL");
      assert.equal(c.n, 4096, "the read after the failed entry was submitted and made");
      assert.deepEqual(c.b, data.subarray(2 * 4096));
      assert.equal(ring.isClosed, false);
      assert.ok(ring.enters <= 2, `${ring.enters} enters`);
      // Still on: the next read goes through it.
      const d = read(1);
      ring.flush();
      ring.drain();
      assert.equal((await d).n, 4096);
    } finally {
      ring.close();
      sysClose(fd);
      await Deno.remove(path);
    }
  },
});
