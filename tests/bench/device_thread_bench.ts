/**
 * What one request costs the device thread, measured on this host without KVM: a driver on
 * the main thread (tests/harness) posts a request, rings the doorbell, and waits for the
 * interrupt, N times, one at a time; the device runs on a device thread
 * (vmm/device_thread.ts) over mmapped RAM. `rng`: a 64-byte buffer (Linux's hwrng requests
 * are that size). `blk`: a 4 KiB read at a random sector of a 64 MiB image in the system's
 * temporary directory (sparse, so every read is made at once). `blk-write`: 4 KiB writes
 * there instead (on a file system without buffered RWF_NOWAIT writes, such as ext4, each
 * goes to the io_uring, or to the blocking pool with TSVMM_IO_URING=0). `blk-cold`: reads
 * of a 1 GiB image of data whose pages are dropped from the page cache first (root), so
 * most reads wait for the disk. `TMPDIR` chooses the directory. A third argument keeps that
 * many requests in flight (up to 32, each through an indirect table). `blk-seq-write`: 1016
 * KiB writes at consecutive offsets, each in 254 descriptors of 4 KiB in an indirect table
 * (what a guest's page-cache writeback sends). Prints the
 * wall time per request and each thread's CPU time per request from /proc/self/task (the
 * device thread is `worker-N`; `V8 DefaultWorker` threads are V8's helpers, serving both
 * sides' garbage collection).
 *
 * Run: deno run -A tests/bench/device_thread_bench.ts rng|blk|blk-write|blk-cold|blk-seq-write [N] [depth]
 */

import { DeviceThread } from "../../vmm/device_thread.ts";
import { VirtioRng } from "../../devices/virtio/rng.ts";
import { VirtioBlk } from "../../devices/virtio/blk.ts";
import { FileBackend } from "../../vmm/block_file.ts";
import { VirtioMmio } from "../../transports/mmio.ts";
import { type Buf, DriverQueue, F, GuestRam, MmioDriver } from "../harness/virtio_driver.ts";
import { privateCell } from "../../vmm/shared_regs.ts";
import { mmapAnonymous, sysClose, sysEventfd, sysMunmap } from "../../vmm/sys/libc.ts";
import { drainEventfd } from "../../vmm/event_loop.ts";

const mode = ["blk", "blk-write", "blk-cold", "blk-seq-write"].includes(Deno.args[0]) ? Deno.args[0] : "rng";
/**
 * blk-seq-write: each request is 254 data descriptors of 4 KiB, not adjacent (virtio-blk's
 * seg_max with a 256-entry queue: a chain may not be longer than its queue).
 */
const SEQ_PAGES = 254;
const kind = mode === "rng" ? "rng" : "blk";
const N = Number(Deno.args[1] ?? "20000");
/** Requests kept in flight (the third argument, default 1: one at a time). */
const DEPTH = Math.max(1, Math.min(32, Number(Deno.args[2] ?? "1")));
const IMAGE_BYTES = mode === "blk-cold" ? 1 << 30 : 64 << 20;
const RAM = 16 << 20;
const ptr = mmapAnonymous(RAM);
const ram = new GuestRam(RAM, 0, new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, RAM)));
const thread = new DeviceThread({
  base: BigInt(Deno.UnsafePointer.value(ptr)),
  size: RAM,
  regions: [{ gpa: 0, offset: 0, size: RAM }],
});
let image: { path: string; backend: FileBackend } | undefined;
if (kind === "blk") {
  const path = await Deno.makeTempFile({ suffix: ".img" });
  await Deno.truncate(path, IMAGE_BYTES); // sparse: every read is of the page cache's zeros
  if (mode === "blk-cold") {
    // Data on the disk, then out of the page cache.
    const f = await Deno.open(path, { write: true });
    const chunk = crypto.getRandomValues(new Uint8Array(1 << 16));
    for (let at = 0; at < IMAGE_BYTES; at += 8 << 20) {
      for (let i = 0; i < (8 << 20); i += chunk.length) await f.write(chunk);
    }
    await f.syncData();
    f.close();
    await Deno.writeTextFile("/proc/sys/vm/drop_caches", "1");
  }
  image = { path, backend: FileBackend.open(path, false) };
}
const dev = image
  ? thread.remote(new VirtioBlk(image.backend), { kind: "blk", disk: image.backend.share() })
  : thread.remote(new VirtioRng({ fill: (b) => crypto.getRandomValues(b) }), { kind: "rng", opts: {} });
const lineFd = sysEventfd();
const resampleFd = sysEventfd();
const notifyFds = dev.queueMaxSizes.map(() => sysEventfd());
const isr = privateCell();
const t = new VirtioMmio(dev, ram.mem, { trigger: () => {} }, isr);
dev.bind(notifyFds, {
  isr: { buffer: isr.array.buffer as SharedArrayBuffer, index: isr.index },
  lineFd,
  resampleFd,
});
const d = new MmioDriver(t);
// virtio-blk's FLUSH, as Linux negotiates it: writes complete once written, not synced.
const BLK_FLUSH = 1n << 9n;
const indirect = DEPTH > 1 || mode === "blk-seq-write";
if (!d.negotiate(F.VERSION_1 | (kind === "blk" ? BLK_FLUSH : 0n) | (indirect ? F.INDIRECT : 0n))) {
  throw new Error("feature negotiation failed");
}
const q = new DriverQueue(ram, mode === "blk-seq-write" ? 256 : 64);
d.setupQueue(0, q);
d.driverOk();
await new Promise((r) => setTimeout(r, 200)); // the device thread has taken DRIVER_OK
/** Each request slot's buffers, and (with several in flight) its indirect table. */
const slots = Array.from({ length: DEPTH }, () => {
  const header = ram.alloc(16);
  return {
    buf: ram.alloc(64),
    header,
    headerView: new DataView(ram.view(header, 16).buffer, ram.view(header, 16).byteOffset, 16),
    data: ram.alloc(4096),
    // blk-seq-write's pages: every other 4 KiB page of a 2 MiB area, so no two are adjacent.
    pages: mode === "blk-seq-write" ? ram.alloc(SEQ_PAGES * 8192, 4096) : 0,
    status: ram.alloc(1),
    table: ram.alloc(16 * (SEQ_PAGES + 2), 16),
  };
});
let seqSector = 0;
/** The slots in flight, by their chain's head (slot k's chain is descriptor k). */
const slotOfHead = new Map<number, number>();
/** Posts one request in slot `k`. */
function post(k = 0): void {
  const { buf, header, headerView, data, pages, status, table } = slots[k];
  let bufs: Buf[];
  if (kind === "rng") bufs = [{ addr: buf, len: 64, write: true }];
  else if (mode === "blk-seq-write") {
    headerView.setUint32(0, 1, true); // VIRTIO_BLK_T_OUT
    headerView.setBigUint64(8, BigInt(seqSector), true);
    seqSector = (seqSector + SEQ_PAGES * 8) % (IMAGE_BYTES / 512);
    bufs = [
      { addr: header, len: 16 },
      ...Array.from({ length: SEQ_PAGES }, (_, i) => ({ addr: pages + i * 8192, len: 4096 })),
      { addr: status, len: 1, write: true },
    ];
  } else {
    const write = mode === "blk-write";
    headerView.setUint32(0, write ? 1 : 0, true); // VIRTIO_BLK_T_OUT or _IN
    headerView.setBigUint64(8, BigInt(Math.floor(Math.random() * (IMAGE_BYTES / 4096)) * 8), true);
    bufs = [{ addr: header, len: 16 }, { addr: data, len: 4096, write: !write }, {
      addr: status,
      len: 1,
      write: true,
    }];
  }
  if (!indirect) {
    q.add(bufs);
    return;
  }
  // Completions come back in any order: each slot keeps its own head and table, so no chain
  // in flight is ever overwritten by a newer one.
  bufs.forEach((b, i) =>
    q.setDesc(i, b.addr, b.len, (b.write ? 2 : 0) | (i < bufs.length - 1 ? 1 : 0), i + 1, table)
  );
  q.setDesc(k, table, 16 * bufs.length, 4, /* INDIRECT */ 0);
  q.publish(k);
  slotOfHead.set(k, k);
}

/** CPU time (ms) of each thread of this process, keyed by "tid:name". */
function threadCpu(): Map<string, number> {
  const out = new Map<string, number>();
  for (const e of Deno.readDirSync("/proc/self/task")) {
    let st: string;
    try {
      st = Deno.readTextFileSync(`/proc/self/task/${e.name}/stat`);
    } catch {
      continue; // the thread ended
    }
    const name = st.slice(st.indexOf("(") + 1, st.lastIndexOf(")"));
    const f = st.slice(st.lastIndexOf(")") + 2).split(" ");
    out.set(`${e.name}:${name}`, (Number(f[11]) + Number(f[12])) * 10);
  }
  return out;
}

/**
 * The driver polls the ISR until the device interrupts; a device that never does (a request
 * it refused with NEEDS_RESET, say) ends the bench with its report instead of a spin for ever.
 */
function awaitInterrupt(): void {
  const give = performance.now() + 10_000;
  for (let n = 0; Atomics.load(isr.array, isr.index) === 0; n++) {
    if ((n & 0xffff) === 0 && performance.now() > give) {
      throw new Error(`no interrupt within 10 s; device status ${t.core.status}: ${dev.describe()}`);
    }
  }
}

const before = threadCpu();
const t0 = performance.now();
if (DEPTH === 1) {
  for (let i = 0; i < N; i++) {
    post();
    d.notify(0);
    awaitInterrupt();
    Atomics.store(isr.array, isr.index, 0);
    drainEventfd(lineFd);
    if (q.takeUsed().length !== 1) throw new Error(`request ${i}: no used entry`);
  }
} else {
  // Keep DEPTH in flight: each completion's slot takes the next request.
  let posted = 0;
  let done = 0;
  for (let k = 0; k < DEPTH && posted < N; k++, posted++) post(k);
  d.notify(0);
  while (done < N) {
    awaitInterrupt();
    Atomics.store(isr.array, isr.index, 0);
    drainEventfd(lineFd);
    const used = q.takeUsed();
    for (const [head] of used) {
      const k = slotOfHead.get(head);
      if (k === undefined) throw new Error(`a used entry for head ${head}, not in flight`);
      slotOfHead.delete(head);
      done++;
      if (posted < N) {
        post(k);
        posted++;
      }
    }
    if (used.length > 0 && posted > done) d.notify(0);
  }
}
const wallUs = (performance.now() - t0) * 1000 / N;
const after = threadCpu();
console.log(
  `${N} ${mode} requests, ${DEPTH === 1 ? "one at a time" : `${DEPTH} in flight`}: ${
    wallUs.toFixed(1)
  } us each (wall)`,
);
for (const [k, v] of after) {
  const us = (v - (before.get(k) ?? 0)) * 1000 / N;
  if (us > 0) console.log(`  ${k.padEnd(28)} ${us.toFixed(1)} us CPU per request`);
}
await thread.refresh();
console.log(`  device ${dev.describe()}`);
await t.core.reset();
await thread.stop();
for (const fd of [lineFd, resampleFd, ...notifyFds]) sysClose(fd);
sysMunmap(ptr, RAM);
if (image) {
  await image.backend.close();
  await Deno.remove(image.path);
}
