/**
 * The device side's hops, measured on this host without KVM: (1) an eventfd signalled from
 * another thread (as KVM signals an ioeventfd) until its handler runs, (1a) on the main
 * thread's loop (epoll_wait on Deno's blocking pool, handler on the V8 event loop) and (1b)
 * on a device thread's loop that blocks in epoll_wait itself (vmm/device_worker.ts);
 * (2) a 4 KiB read of a cached file issued by the block backend until its promise settles.
 * Prints medians and 90th percentiles in microseconds.
 *
 * Run: deno run -A tests/bench/loop_bench.ts [ROUNDS]
 */

import { drainEventfd, EventLoop, signalEventfd } from "../../vmm/event_loop.ts";
import { sysClose, sysEventfd } from "../../vmm/sys/libc.ts";
import { FileBackend } from "../../vmm/block_file.ts";

const rounds = Number(Deno.args[0] ?? "2000");

function stats(xs: number[]): string {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))];
  return `median ${q(0.5).toFixed(1)} us, p90 ${q(0.9).toFixed(1)} us`;
}

// (1) eventfd -> handler. A Worker signals the eventfd when told to through shared memory
// and stamps the time; the handler stamps its own.
const efd = sysEventfd();
const sab = new SharedArrayBuffer(16);
const ctl = new Int32Array(sab, 0, 2);
const stamp = new Float64Array(sab, 8, 1);
const worker = new Worker(
  `data:application/javascript,${
    encodeURIComponent(`
    const lib = Deno.dlopen("libc.so.6", { write: { parameters: ["i32", "buffer", "usize"], result: "isize" } });
    const one = new BigUint64Array([1n]);
    self.onmessage = (e) => {
      const { sab, fd } = e.data;
      const ctl = new Int32Array(sab, 0, 2), stamp = new Float64Array(sab, 8, 1);
      for (;;) {
        Atomics.wait(ctl, 0, 0);
        if (Atomics.load(ctl, 0) === 2) break;
        Atomics.store(ctl, 0, 0);
        stamp[0] = performance.timeOrigin + performance.now();
        lib.symbols.write(fd, new Uint8Array(one.buffer), 8n);
      }
    };`)
  }`,
  { type: "module" },
);
worker.postMessage({ sab, fd: efd });
const loop = new EventLoop();
const lat: number[] = [];
let done: (() => void) | undefined;
loop.add(efd, () => {
  drainEventfd(efd);
  lat.push((performance.timeOrigin + performance.now() - stamp[0]) * 1000);
  done?.();
});
loop.start();
await new Promise((r) => setTimeout(r, 100));
for (let i = 0; i < rounds; i++) {
  const p = new Promise<void>((r) => done = r);
  Atomics.store(ctl, 0, 1);
  Atomics.notify(ctl, 0);
  await p;
  if (i % 4 === 3) await new Promise((r) => setTimeout(r, 0)); // let the loop idle sometimes
}
Atomics.store(ctl, 0, 2);
Atomics.notify(ctl, 0);
worker.terminate();
await loop.stop();
console.log(`eventfd from another thread -> handler on the main thread: ${stats(lat.slice(100))}`);

// (1b) the same into a Worker whose loop blocks in epoll_wait; the main thread signals and
// waits for the handler's stamp.
{
  const efd2 = sysEventfd();
  const sab2 = new SharedArrayBuffer(16);
  const ctl2 = new Int32Array(sab2, 0, 2);
  const stamp2 = new Float64Array(sab2, 8, 1);
  const w = new Worker(new URL("./loop_bench_worker.ts", import.meta.url), { type: "module" });
  w.postMessage({ sab: sab2, fd: efd2 });
  while (Atomics.load(ctl2, 0) === 0) await new Promise((r) => setTimeout(r, 10));
  await new Promise((r) => setTimeout(r, 100));
  const lat2: number[] = [];
  for (let i = 0; i < rounds; i++) {
    Atomics.store(ctl2, 1, 0);
    const t = performance.timeOrigin + performance.now();
    signalEventfd(efd2);
    Atomics.wait(ctl2, 1, 0, 1000);
    lat2.push((stamp2[0] - t) * 1000);
    if (i % 4 === 3) await new Promise((r) => setTimeout(r, 0)); // let the loop idle sometimes
  }
  Atomics.store(ctl2, 0, 2);
  signalEventfd(efd2);
  await new Promise((r) => setTimeout(r, 100));
  w.terminate();
  sysClose(efd2);
  console.log(
    `eventfd from another thread -> handler on a blocking device thread: ${stats(lat2.slice(100))}`,
  );
}

// (2) a cached 4 KiB read through the block backend.
const path = await Deno.makeTempFile();
await Deno.writeFile(path, new Uint8Array(1 << 20));
const disk = FileBackend.open(path, false);
const buf = new Uint8Array(4096);
const rl: number[] = [];
for (let i = 0; i < rounds; i++) {
  const t = performance.now();
  await disk.read([buf], ((i * 7) % 256) * 4096);
  rl.push((performance.now() - t) * 1000);
}
await disk.close();
await Deno.remove(path);
console.log(`4 KiB cached read through the block backend: ${stats(rl.slice(100))}`);
