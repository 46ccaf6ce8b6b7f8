/**
 * Run as its own process with `--v8-flags=--expose-gc` by block_file_test.ts. It drives the
 * VMM's file backend the way a busy guest does, in the conditions where a buffer handed to
 * a nonblocking FFI call by address can be collected before the call runs:
 *
 * 1. warm the vectored read/write path up until V8 optimizes it;
 * 2. park hundreds of blocking calls (reads on an empty pipe) so Deno's blocking pool is
 *    full and new calls queue;
 * 3. issue 256 two-buffer reads and 256 two-buffer writes (they queue behind the parked ones);
 * 4. force a GC and fill the freed memory with garbage;
 * 5. release the parked calls and check every read returned the image's bytes and every
 *    write reached the image.
 *
 * Prints "iovec-probe ok" and exits 0 when every request did what it should; anything
 * else (a wrong byte, a failed call, a crash) is a failure.
 */

import { FileBackend } from "../../vmm/block_file.ts";
import { parkBlockingPool } from "../harness/blocking_pool.ts";

const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) {
  console.error("run with --v8-flags=--expose-gc");
  Deno.exit(3);
}

const PARKED = Number(Deno.args[0] ?? 600);
const WARMUP = Number(Deno.args[1] ?? 200_000);
const SECTORS = 2048;
const path = await Deno.makeTempFile({ suffix: ".img" });
const image = new Uint8Array(SECTORS * 512);
for (let s = 0; s < SECTORS; s++) {
  image.fill(s & 0xff, s * 512, s * 512 + 256).fill(~s & 0xff, s * 512 + 256, s * 512 + 512);
}
await Deno.writeFile(path, image);

// Every transfer through the blocking pool: that is the path whose buffers must stay pinned.
const disk = FileBackend.open(path, false, { nowait: false });
let failures = 0;
const fail = (what: string) => {
  if (failures++ < 10) console.error("FAIL:", what);
};

try {
  // 1. Warm-up: two-buffer reads of sector pairs, checked.
  const a = new Uint8Array(512), b = new Uint8Array(512);
  for (let i = 0; i < WARMUP; i++) {
    const s = i % (SECTORS - 1);
    await disk.read([a, b], s * 512);
    if (a[0] !== (s & 0xff) || b[0] !== ((s + 1) & 0xff)) fail(`warm-up read of sector ${s}`);
  }

  // 2. Park blocking calls on an empty pipe.
  const pool = parkBlockingPool(PARKED);

  // 3. Requests that queue behind them: reads of sectors 0..255, writes of sectors 1024..1279.
  // Each outcome is caught at once: a rejection is a failure to report, not a crash.
  const settle = (p: Promise<void>) => p.then(() => undefined, (e: Error) => e);
  const reads: Array<{ s: number; x: Uint8Array; y: Uint8Array; p: Promise<Error | undefined> }> = [];
  const writes: Array<{ s: number; p: Promise<Error | undefined> }> = [];
  for (let i = 0; i < 256; i++) {
    const x = new Uint8Array(256), y = new Uint8Array(256);
    reads.push({ s: i, x, y, p: settle(disk.read([x, y], i * 512)) });
    const s = 1024 + i;
    const wx = new Uint8Array(300).fill(0xa0 ^ (i & 0x3f)), wy = new Uint8Array(212).fill(0x5a);
    writes.push({ s, p: settle(disk.write([wx, wy], s * 512)) });
  }

  // 4. Collect and overwrite what was freed.
  for (let round = 0; round < 3; round++) {
    gc();
    const junk: BigUint64Array[] = [];
    for (let i = 0; i < 20_000; i++) {
      // Small typed arrays live on V8's heap until something asks for their buffer; asking
      // moves them to malloc'd memory, the same kind a pointer's owner had.
      const j = new BigUint64Array(4).fill(0x4141_4141_4141_4141n);
      void j.buffer;
      junk.push(j);
    }
    gc();
  }

  // 5. Release the parked reads and check every request.
  await pool.release();
  for (const r of reads) {
    const e = await r.p;
    if (e) {
      fail(`read of sector ${r.s} rejected: ${e.message}`);
      continue;
    }
    if (!r.x.every((v) => v === (r.s & 0xff)) || !r.y.every((v) => v === (~r.s & 0xff))) {
      fail(`read of sector ${r.s} returned wrong bytes`);
    }
  }
  for (const w of writes) {
    const e = await w.p;
    if (e) fail(`write of sector ${w.s} rejected: ${e.message}`);
  }
  await disk.close();
  const after = await Deno.readFile(path);
  for (const w of writes) {
    const i = w.s - 1024;
    const sec = after.subarray(w.s * 512, w.s * 512 + 512);
    const want = (o: number) => o < 300 ? 0xa0 ^ (i & 0x3f) : 0x5a;
    for (let o = 0; o < 512; o++) {
      if (sec[o] !== want(o)) {
        fail(`sector ${w.s} byte ${o} is 0x${sec[o].toString(16)} after the write`);
        break;
      }
    }
  }
  for (let s = 0; s < SECTORS; s++) {
    if (s >= 1024 && s < 1280) continue;
    const sec = after.subarray(s * 512, s * 512 + 512);
    if (!sec.every((v, o) => v === image[s * 512 + o])) fail(`sector ${s} changed though nothing wrote it`);
  }
} finally {
  await Deno.remove(path);
}
if (failures) {
  console.error(`iovec-probe: ${failures} failures`);
  Deno.exit(1);
}
console.log("iovec-probe ok");
