/**
 * Run as its own process with `--v8-flags=--expose-gc` by uring_test.ts. The io_uring keeps
 * every buffer an operation points at referenced until its completion is reaped; this probe
 * checks it where it matters: writes the kernel can only carry out later.
 *
 * 1. fill a pipe (blocking) to its capacity, so writes to it must wait;
 * 2. hand the ring 64 writes of 512 bytes each, from buffers nothing else references;
 * 3. force a GC and fill the freed memory with garbage;
 * 4. empty the pipe: the writes go through now, each reading its buffer;
 * 5. read what they wrote: every byte must be its buffer's pattern, not the garbage.
 *
 * Prints "uring-probe ok" and exits 0 when every byte is right; anything else is a failure.
 */

import { Uring } from "../../vmm/sys/uring.ts";
import { Iovecs } from "../../vmm/sys/iovec.ts";
import { sysClose } from "../../vmm/sys/libc.ts";

const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) {
  console.error("run with --v8-flags=--expose-gc");
  Deno.exit(3);
}
const F_GETPIPE_SZ = 1032;
const c = Deno.dlopen("libc.so.6", {
  pipe: { parameters: ["buffer"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
}).symbols;

const fds = new Int32Array(2);
if (c.pipe(new Uint8Array(fds.buffer)) !== 0) throw new Error("pipe failed");
const [rd, wr] = fds;
const capacity = c.fcntl(wr, F_GETPIPE_SZ, 0);
const filler = new Uint8Array(capacity).fill(0xff);
if (Number(c.write(wr, filler, BigInt(capacity))) !== capacity) throw new Error("could not fill the pipe");

const ring = Uring.open(64);
if (!ring) throw new Error("no io_uring here");
const WRITES = 64, LEN = 512;
const results: Promise<number>[] = [];
/** Submits write `i` from a buffer only the ring references once this returns. */
function submit(i: number): void {
  const b = new Uint8Array(LEN).fill(i + 1);
  const iov = new Iovecs(1);
  const p = ring!.vectored(true, wr, iov, iov.fill([b]), 0, [b]);
  if (!p) throw new Error(`write ${i} not taken`);
  results.push(p);
}
for (let i = 0; i < WRITES; i++) submit(i);

// Garbage where the buffers were, if they were freed.
const junk: Uint8Array[] = [];
for (let round = 0; round < 3; round++) {
  gc();
  for (let i = 0; i < 20_000; i++) {
    const j = new Uint8Array(LEN).fill(0xee);
    void j.buffer;
    junk.push(j);
  }
}
gc();

// Make room: the parked writes run now.
const drop = new Uint8Array(capacity);
let left = capacity;
while (left > 0) left -= Number(c.read(rd, drop, BigInt(left)));
ring.drain();
let failures = 0;
const got = await Promise.all(results);
if (!got.every((n) => n === LEN)) {
  failures++;
  console.error(`FAIL: write results ${got.join(",")}`);
}
const out = new Uint8Array(WRITES * LEN);
let have = 0;
while (have < out.length) have += Number(c.read(rd, out.subarray(have), BigInt(out.length - have)));
// Writes to a pipe from one ring may complete in any order: count each pattern's bytes.
const counts = new Map<number, number>();
for (const v of out) counts.set(v, (counts.get(v) ?? 0) + 1);
for (let i = 0; i < WRITES; i++) {
  if (counts.get(i + 1) !== LEN) {
    failures++;
    if (failures < 10) console.error(`FAIL: pattern ${i + 1} came out ${counts.get(i + 1) ?? 0} times`);
  }
}
if ((counts.get(0xee) ?? 0) > 0) {
  failures++;
  console.error(`FAIL: ${counts.get(0xee)} bytes of garbage were written`);
}
if (junk.some((j) => j.some((v) => v !== 0xee))) {
  failures++;
  console.error("FAIL: the garbage was overwritten");
}
ring.close();
sysClose(rd);
sysClose(wr);
if (failures) Deno.exit(1);
console.log("uring-probe ok");
