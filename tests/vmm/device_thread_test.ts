/**
 * The device thread without KVM: a driver (tests/harness) on the main thread writes the
 * transport's registers over host memory the Worker maps too; the Worker serves the queue,
 * writes the used ring and raises the interrupt (ISR cell + line eventfd) by itself.
 */

import assert from "node:assert/strict";
import { type Buf, DriverQueue, F, GuestRam, MmioDriver } from "../harness/virtio_driver.ts";
import { request } from "../harness/blk.ts";
import { VirtioMmio } from "../../transports/mmio.ts";
import { VirtioRng } from "../../devices/virtio/rng.ts";
import { VirtioBlk } from "../../devices/virtio/blk.ts";
import { BLK_S, BLK_T } from "../../devices/virtio/blk_request.ts";
import { STATUS, type VirtioDevice } from "../../devices/virtio/device.ts";
import {
  DEVICE_THREAD_NICE,
  type DeviceSpec,
  DeviceThread,
  type RemoteDevice,
} from "../../vmm/device_thread.ts";
import { drainEventfd, signalEventfd } from "../../vmm/event_loop.ts";
import { FileBackend } from "../../vmm/block_file.ts";
import { ioUringForbidden } from "../harness/io_uring_host.ts";
import { privateCell, type SharedCell } from "../../vmm/shared_regs.ts";
import { mmapAnonymous, sysClose, sysEventfd, sysMunmap } from "../../vmm/sys/libc.ts";

const RAM = 8 << 20;

/** A driver for `dev` behind virtio-MMIO over `ram`, features negotiated and queue 0 (64 entries) live. */
function driverFor(dev: VirtioDevice, ram: GuestRam, isr: SharedCell, features: bigint, trigger = () => {}) {
  const t = new VirtioMmio(dev, ram.mem, { trigger }, isr);
  const d = new MmioDriver(t);
  assert.ok(d.negotiate(features));
  const q = new DriverQueue(ram, 64);
  d.setupQueue(0, q);
  d.driverOk();
  return { t, d, q };
}

/** A device on a device thread behind virtio-MMIO, over mmapped RAM, driver set up. */
function threaded(local: VirtioDevice, spec: DeviceSpec, features: bigint) {
  const ptr = mmapAnonymous(RAM);
  const bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, RAM));
  const ram = new GuestRam(RAM, 0, bytes);
  const thread = new DeviceThread({
    base: BigInt(Deno.UnsafePointer.value(ptr)),
    size: RAM,
    regions: [{ gpa: 0, offset: 0, size: RAM }],
  });
  const dev = thread.remote(local, spec);
  const lineFd = sysEventfd();
  const resampleFd = sysEventfd();
  const notifyFds = dev.queueMaxSizes.map(() => sysEventfd());
  const isr = privateCell();
  let mainIrqs = 0;
  dev.bind(notifyFds, {
    isr: { buffer: isr.array.buffer as SharedArrayBuffer, index: isr.index },
    lineFd,
    resampleFd,
  });
  const { t, d, q } = driverFor(dev, ram, isr, features, () => mainIrqs++);
  const close = async () => {
    await t.core.reset();
    await thread.stop();
    for (const fd of [lineFd, resampleFd, ...notifyFds]) sysClose(fd);
    sysMunmap(ptr, RAM);
  };
  return { ram, d, q, t, dev, isr, lineFd, resampleFd, thread, close, mainIrqs: () => mainIrqs };
}

async function until(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 1000; i++) {
    if (ok()) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`timed out waiting for ${what}`);
}

Deno.test("device thread: rng requests are served on the Worker, which raises the ISR and the line itself", async () => {
  const local = new VirtioRng({ fill: (b) => crypto.getRandomValues(b) });
  const vm = threaded(local, { kind: "rng", opts: {} }, F.VERSION_1 | F.EVENT_IDX);
  try {
    const buf = vm.ram.alloc(4096);
    vm.q.add([{ addr: buf, len: 4096, write: true }]);
    vm.d.notify(0); // through the register: the main thread rings the Worker's doorbell
    let used: Array<[number, number]> = [];
    await until("the used entry", () => (used = vm.q.takeUsed()).length > 0);
    assert.deepEqual(used.map(([, l]) => l), [4096]);
    assert.ok(new Set(vm.ram.view(buf, 4096)).size > 200, "the Worker wrote random bytes into guest RAM");
    await until("the line eventfd", () => drainEventfd(vm.lineFd) > 0);
    assert.equal(Atomics.load(vm.isr.array, vm.isr.index) & 1, 1, "ISR used-ring bit set by the Worker");
    assert.equal(vm.mainIrqs(), 0, "nothing went through the main thread's interrupt path");
    // The guest's EOI (resample) while the ISR is still set raises the line again; after the
    // driver acknowledged it, an EOI raises nothing.
    signalEventfd(vm.resampleFd);
    await until("the line raised again", () => drainEventfd(vm.lineFd) > 0);
    vm.d.ackInterrupts();
    signalEventfd(vm.resampleFd);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(drainEventfd(vm.lineFd), 0, "no line once the ISR is clear");
    // Three more requests one at a time, each asking for its interrupt (used_event): the
    // Worker's report splits doorbell -> interrupt from interrupt -> next doorbell.
    for (let i = 0; i < 3; i++) {
      vm.q.setUsedEvent(1 + i);
      vm.q.add([{ addr: buf, len: 64, write: true }]);
      vm.d.notify(0);
      await until("the used entry", () => vm.q.takeUsed().length > 0);
      await until("the line eventfd", () => drainEventfd(vm.lineFd) > 0);
    }
    await vm.thread.refresh();
    assert.match(
      vm.dev.describe(),
      /doorbell_to_irq_us=\d+ \(3\) p90=\d+ mean=\d+ irq_to_doorbell_us=\d+ \(3\) p90=\d+ mean=\d+/,
    );
    // The Worker raised its priority where this process may (root may), and its report
    // says what it got; one of this process's threads runs at that nice value.
    const report = vm.dev.describe();
    const nice = /nice=(-?\d+)/.exec(report);
    assert.ok(nice, report);
    if (!report.includes("refused")) assert.equal(Number(nice[1]), DEVICE_THREAD_NICE);
    const nices = [...Deno.readDirSync("/proc/self/task")].flatMap((t) => {
      try {
        const stat = Deno.readTextFileSync(`/proc/self/task/${t.name}/stat`);
        return [Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16])];
      } catch {
        return []; // a thread that ended meanwhile
      }
    });
    assert.ok(nices.includes(Number(nice[1])), `no thread at ${nice[0]}: ${nices}`);
  } finally {
    await vm.close();
  }
});

Deno.test("device thread: a broken chain on the Worker sets DEVICE_NEEDS_RESET; a reset waits and then serves again", async () => {
  const local = new VirtioRng({ fill: (b) => crypto.getRandomValues(b) });
  const vm = threaded(local, { kind: "rng", opts: {} }, F.VERSION_1);
  try {
    const bad: Buf = { addr: RAM - 16, len: 4096, write: true }; // runs past the end of RAM
    vm.q.add([bad]);
    vm.d.notify(0);
    await until("NEEDS_RESET", () => (vm.d.status() & STATUS.DEVICE_NEEDS_RESET) !== 0);
    assert.deepEqual(vm.q.takeUsed(), [], "no used entry for the broken chain");
    await vm.t.core.reset();
    assert.equal(vm.d.status(), 0);
    // Set up again from scratch: the Worker serves the new rings.
    assert.ok(vm.d.negotiate(F.VERSION_1));
    const q2 = new DriverQueue(vm.ram, 64);
    vm.d.setupQueue(0, q2);
    vm.d.driverOk();
    q2.add([{ addr: vm.ram.alloc(512), len: 512, write: true }]);
    vm.d.notify(0);
    await until("a used entry after the reset", () => q2.usedIdx() === 1);
  } finally {
    await vm.close();
  }
});

for (const via of ["io_uring", "the blocking pool"]) {
  Deno.test(`device thread: virtio-blk through ${via} (write, read, discard, flush), served from the Worker`, async () => {
    const path = await Deno.makeTempFile({ suffix: ".img" });
    await Deno.writeFile(path, new Uint8Array(1 << 20));
    const backend = FileBackend.open(path, false, { nowait: false }); // no transfer made at once
    const local = new VirtioBlk(backend);
    const all = F.VERSION_1 | F.EVENT_IDX | F.INDIRECT | (local.features & ~(F.EVENT_IDX | F.INDIRECT));
    // The Worker reads the switch when it attaches the disk (the environment is the process's).
    if (via === "the blocking pool") Deno.env.set("TSVMM_IO_URING", "0");
    const vm = threaded(local, { kind: "blk", disk: backend.share() }, all);
    try {
      const h = {
        ...vm,
        dev: local,
        irq: undefined,
        backend,
        path,
        close: vm.close,
      } as unknown as Parameters<
        typeof request
      >[0];
      const data = new Uint8Array(4096).map((_, i) => (i * 7) & 0xff);
      const w = await request(h, BLK_T.OUT, 8, { len: 4096, bytes: data });
      assert.equal(w.status, BLK_S.OK);
      const onDisk = (await Deno.readFile(path)).subarray(8 * 512, 8 * 512 + 4096);
      assert.deepEqual(onDisk, data, "the write is in the image");
      const r = await request(h, BLK_T.IN, 8, { len: 4096, write: true });
      assert.equal(r.status, BLK_S.OK);
      assert.deepEqual(vm.ram.view(r.buf, 4096), data);
      // Steps on Deno's blocking pool (every transfer here, a discard, a flush): the device
      // thread must not block in epoll_wait while one is in flight.
      const seg = new Uint8Array(16);
      new DataView(seg.buffer).setBigUint64(0, 8n, true);
      new DataView(seg.buffer).setUint32(8, 8, true);
      // Eight reads behind one doorbell: one pass of the device thread starts them all, and
      // a ring hands them to the kernel in one io_uring_enter.
      const pattern = new Uint8Array(8 * 4096).map((_, i) => (i * 13 + 5) & 0xff);
      assert.equal(
        (await request(h, BLK_T.OUT, 64, { len: pattern.length, bytes: pattern })).status,
        BLK_S.OK,
      );
      const reads = Array.from({ length: 8 }, (_, i) => {
        const hdr = vm.ram.alloc(16);
        vm.ram.dv(hdr, 16).setUint32(0, BLK_T.IN, true);
        vm.ram.dv(hdr, 16).setBigUint64(8, BigInt(64 + 8 * i), true);
        const buf = vm.ram.alloc(4096, 512);
        const status = vm.ram.alloc(1);
        vm.q.add([{ addr: hdr, len: 16 }, { addr: buf, len: 4096, write: true }, {
          addr: status,
          len: 1,
          write: true,
        }]);
        return { buf, status };
      });
      vm.d.notify(0);
      let used = 0;
      await until("the eight reads", () => (used += vm.q.takeUsed().length) === 8);
      reads.forEach(({ buf, status }, i) => {
        assert.equal(vm.ram.view(status, 1)[0], BLK_S.OK);
        assert.deepEqual(vm.ram.view(buf, 4096), pattern.subarray(i * 4096, (i + 1) * 4096), `read ${i}`);
      });
      assert.equal((await request(h, BLK_T.DISCARD, 0, { len: 16, bytes: seg })).status, BLK_S.OK);
      assert.equal((await request(h, BLK_T.FLUSH, 0, { len: 0 })).status, BLK_S.OK);
      const img = await Deno.readFile(path);
      assert.equal(img[8 * 512], 0, "discarded");
      const out = await request(h, BLK_T.IN, 2048, { len: 512, write: true });
      assert.equal(out.status, BLK_S.IOERR, "past the end");
      await vm.thread.refresh();
      assert.match(local.name, /virtio-blk/);
      // Two writes, nine reads, the discard and the flush (each in one call), in six enters
      // on a ring (one for the eight reads); the pool's count is of transfers only.
      const report = vm.dev.describe();
      if (via === "io_uring" && !ioUringForbidden()) {
        assert.match(report, / at_once=0 uring=13 pool=0 .* io_uring=on uring_enters=6 /, report);
      } else if (via === "io_uring") {
        assert.match(report, / at_once=0 uring=0 pool=11 .* io_uring=refused\(.* uring_enters=0 /, report);
      } else assert.match(report, / at_once=0 uring=0 pool=11 .* io_uring=off uring_enters=0 /, report);
    } finally {
      Deno.env.delete("TSVMM_IO_URING");
      await vm.close();
      await backend.close();
      await Deno.remove(path);
    }
  });
}

/** The device thread's report lines once `ok` holds for them (refreshed every 5 ms). */
async function reportsWhen(thread: DeviceThread, devs: RemoteDevice[], ok: (lines: string[]) => boolean) {
  let lines: string[] = [];
  for (let i = 0; i < 2000; i++) {
    await thread.refresh();
    lines = devs.map((d) => d.describe());
    if (ok(lines)) return lines;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`timed out; the reports: ${lines.join(" | ")}`);
}

Deno.test("device thread: each device kind is rehearsed first on memory of its own; guest RAM, the image and the guest's interrupts are untouched", async () => {
  const ptr = mmapAnonymous(RAM);
  const bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, RAM)).fill(0x5a);
  const path = await Deno.makeTempFile({ suffix: ".img" });
  const pattern = new Uint8Array(64 << 10).map((_, i) => (i * 13 + 1) & 0xff);
  await Deno.writeFile(path, pattern);
  const backend = FileBackend.open(path, false); // writable: the twin still must not write
  const thread = new DeviceThread(
    {
      base: BigInt(Deno.UnsafePointer.value(ptr)),
      size: RAM,
      regions: [{ gpa: 0, offset: 0, size: RAM }],
    },
    DEVICE_THREAD_NICE,
    300,
    60_000, // time enough on a loaded host: this test wants every request served
    60_000,
  );
  const fds: number[] = [];
  const eventfd = () => {
    fds.push(sysEventfd());
    return fds[fds.length - 1];
  };
  const devs: RemoteDevice[] = [];
  const cells = [privateCell(), privateCell()];
  const lines = [eventfd(), eventfd()];
  try {
    devs.push(
      thread.remote(new VirtioRng({ fill: (b) => crypto.getRandomValues(b) }), { kind: "rng", opts: {} }),
    );
    devs.push(thread.remote(new VirtioBlk(backend), { kind: "blk", disk: backend.share() }));
    devs.forEach((d, i) =>
      d.bind(d.queueMaxSizes.map(eventfd), {
        isr: { buffer: cells[i].array.buffer as SharedArrayBuffer, index: cells[i].index },
        lineFd: lines[i],
      })
    );
    const reports = await reportsWhen(
      thread,
      devs,
      (ls) => ls.every((l) => !/warmup=(none|running)/.test(l)),
    );
    for (const r of reports) assert.match(r, /warmup=300\/300,\d+ms( |$)/);
    assert.ok(bytes.every((b) => b === 0x5a), "guest RAM unchanged");
    assert.deepEqual(await Deno.readFile(path), pattern, "image unchanged");
    for (const fd of lines) assert.equal(drainEventfd(fd), 0, "no interrupt on the guest's line");
    for (const c of cells) assert.equal(Atomics.load(c.array, c.index), 0, "the guest's ISR untouched");
    // The guest's own device is served as usual afterwards (the twin shared the image's fd).
    const ram = new GuestRam(RAM, 0, bytes);
    const { t, d, q } = driverFor(devs[1], ram, cells[1], F.VERSION_1);
    const h = { ram, d, q, dev: devs[1], irq: undefined } as unknown as Parameters<typeof request>[0];
    const r = await request(h, BLK_T.IN, 16, { len: 4096, write: true });
    assert.equal(r.status, BLK_S.OK);
    assert.deepEqual(ram.view(r.buf, 4096), pattern.subarray(16 * 512, 16 * 512 + 4096));
    await t.core.reset();
  } finally {
    await thread.stop();
    for (const fd of fds) sysClose(fd);
    sysMunmap(ptr, RAM);
    await backend.close();
    await Deno.remove(path);
  }
});

/** A virtio-rng on `thread` with one doorbell and a line, and the ISR cell it raises. */
function rngOn(thread: DeviceThread, notifyFd: number, lineFd: number) {
  const cell = privateCell();
  const dev = thread.remote(new VirtioRng({ fill: (b) => crypto.getRandomValues(b) }), {
    kind: "rng",
    opts: {},
  });
  dev.bind([notifyFd], {
    isr: { buffer: cell.array.buffer as SharedArrayBuffer, index: cell.index },
    lineFd,
  });
  return { dev, cell };
}

Deno.test("device thread: the guest's first doorbell ends a rehearsal still running; the guest's request is served", async () => {
  const ptr = mmapAnonymous(RAM);
  const bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, RAM));
  const thread = new DeviceThread(
    { base: BigInt(Deno.UnsafePointer.value(ptr)), size: RAM, regions: [{ gpa: 0, offset: 0, size: RAM }] },
    DEVICE_THREAD_NICE,
    1e9, // far more than it can serve before the guest comes
    60_000,
    60_000,
  );
  const notify = sysEventfd();
  const line = sysEventfd();
  try {
    const { dev, cell } = rngOn(thread, notify, line);
    await reportsWhen(thread, [dev], ([l]) => l.includes("warmup=running"));
    const ram = new GuestRam(RAM, 0, bytes);
    const { t, d, q } = driverFor(dev, ram, cell, F.VERSION_1);
    const buf = ram.alloc(64);
    q.add([{ addr: buf, len: 64, write: true }]);
    d.notify(0);
    await until("the guest's used entry", () => q.takeUsed().length > 0);
    const [report] = await reportsWhen(thread, [dev], ([l]) => !l.includes("warmup=running"));
    assert.match(report, /warmup=\d+\/1000000000,\d+ms,the_guest_started( |$)/);
    await t.core.reset();
  } finally {
    await thread.stop();
    for (const fd of [notify, line]) sysClose(fd);
    sysMunmap(ptr, RAM);
  }
});

Deno.test("device thread: a rehearsal ends at its time budget, whatever it has served; at nice 19 the longer one", async () => {
  const ptr = mmapAnonymous(RAM);
  const thread = new DeviceThread(
    { base: BigInt(Deno.UnsafePointer.value(ptr)), size: RAM, regions: [{ gpa: 0, offset: 0, size: RAM }] },
    DEVICE_THREAD_NICE,
    1e9,
    100,
    600,
  );
  const fds = [sysEventfd(), sysEventfd()];
  try {
    const { dev } = rngOn(thread, fds[0], fds[1]);
    const [report] = await reportsWhen(thread, [dev], ([l]) => /warmup=\d/.test(l));
    const m = /warmup=(\d+)\/1000000000,(\d+)ms,out_of_time( |$)/.exec(report);
    assert.ok(m, report);
    // Where the thread could raise its priority (root here), it rehearsed at nice 19 and may
    // come back: the longer budget; else the shorter one.
    const niced = DEVICE_THREAD_NICE < 0 && /nice=-\d/.test(report);
    const budget = niced ? 600 : 100;
    assert.ok(
      Number(m[2]) >= budget,
      `ended after ${m[2]} ms, before its budget of ${budget} ms (${report})`,
    );
    if (niced) assert.ok(Number(m[2]) < 5000, `ended after ${m[2]} ms`);
  } finally {
    await thread.stop();
    for (const fd of fds) sysClose(fd);
    sysMunmap(ptr, RAM);
  }
});

Deno.test("device thread: a rehearsal still running when the thread stops ends with it, its fds closed", async () => {
  const openFds = () => [...Deno.readDirSync("/proc/self/fd")].length;
  const ptr = mmapAnonymous(RAM);
  const layout = {
    base: BigInt(Deno.UnsafePointer.value(ptr)),
    size: RAM,
    regions: [{ gpa: 0, offset: 0, size: RAM }],
  };
  // Deno keeps a few fds of the Workers it ran (two, after the first two Workers here): count
  // once those exist.
  for (let i = 0; i < 2; i++) await new DeviceThread(layout, DEVICE_THREAD_NICE, 0).stop();
  await new Promise((r) => setTimeout(r, 300));
  const before = openFds();
  const thread = new DeviceThread(layout, DEVICE_THREAD_NICE, 1e9, 60_000, 60_000);
  const fds = [sysEventfd(), sysEventfd()];
  try {
    const { dev } = rngOn(thread, fds[0], fds[1]);
    await reportsWhen(thread, [dev], ([l]) => l.includes("warmup=running"));
    let timer: ReturnType<typeof setTimeout> | undefined;
    const stopped = await Promise.race([
      thread.stop().then(() => "stopped"),
      new Promise((r) => timer = setTimeout(() => r("hung"), 10_000)),
    ]);
    clearTimeout(timer);
    assert.equal(stopped, "stopped");
  } finally {
    for (const fd of fds) sysClose(fd);
    sysMunmap(ptr, RAM);
  }
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(openFds(), before, "every fd the thread and its rehearsal opened is closed");
});
