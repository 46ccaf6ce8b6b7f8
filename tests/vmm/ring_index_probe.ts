/**
 * Run by guest_memory_test.ts in a process of its own: a Worker stores a ring index that crosses a
 * byte boundary (0x00ff, 0x0100, 0x00ff, ...) through GuestMemory.setU16 while this thread
 * reads it through GuestMemory.u16, as the guest's driver and our device thread do with
 * avail.idx and used.idx. A value that is neither (0x0000 or 0x01ff) is half of each: the
 * reader would take stale ring entries for new ones. Prints "ring-index-probe ok" or what
 * it saw.
 */

import { GuestMemory } from "../../vmm/memory.ts";

const MS = Number(Deno.args[0] ?? "1000");
if (import.meta.main && !(globalThis as { WorkerGlobalScope?: unknown }).WorkerGlobalScope) {
  const sab = new SharedArrayBuffer(4096);
  // [0]: stop, set by this thread; [1]: started, set by the Worker.
  const stop = new Int32Array(new SharedArrayBuffer(8));
  const mem = new GuestMemory([{ gpa: 0x1000, bytes: new Uint8Array(sab) }]);
  mem.setU16(0x1002, 0x00ff);
  const w = new Worker(import.meta.url, { type: "module" });
  w.postMessage({ sab, stop: stop.buffer });
  // Time only the overlap: from the Worker's first stores (it sets [1] when it starts).
  while (Atomics.load(stop, 1) === 0) { /* the Worker is starting */ }
  let reads = 0;
  let torn = 0;
  const seen = new Set<number>();
  const t0 = performance.now();
  while (performance.now() - t0 < MS) {
    const v = mem.u16(0x1002);
    reads++;
    if (v !== 0x00ff && v !== 0x0100) {
      torn++;
      seen.add(v);
    }
  }
  Atomics.store(stop, 0, 1);
  const flips = await new Promise<number>((r) => (w.onmessage = (e) => r(e.data)));
  w.terminate();
  const ok = torn === 0 && flips > 1000 && reads > 1000;
  console.log(
    `${
      ok ? "ring-index-probe ok" : "ring-index-probe FAILED"
    }: ${reads} reads, ${flips} stores, ${torn} torn` +
      (seen.size ? ` (${[...seen].map((v) => "0x" + v.toString(16)).join(", ")})` : ""),
  );
} else {
  self.onmessage = (e: MessageEvent<{ sab: SharedArrayBuffer; stop: ArrayBuffer }>) => {
    const mem = new GuestMemory([{ gpa: 0x1000, bytes: new Uint8Array(e.data.sab) }]);
    const stop = new Int32Array(e.data.stop);
    let n = 0;
    for (let k = 0; k < 256; k++) mem.setU16(0x1002, (n++ & 1) ? 0x0100 : 0x00ff);
    Atomics.store(stop, 1, 1);
    while (Atomics.load(stop, 0) === 0) {
      for (let k = 0; k < 256; k++) mem.setU16(0x1002, (n++ & 1) ? 0x0100 : 0x00ff);
    }
    self.postMessage(n);
  };
}
