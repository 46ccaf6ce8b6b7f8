/**
 * The device thread's Worker (device_thread.ts): builds each device from its spec, watches
 * the doorbells, and runs the devices on an event loop that blocks in epoll_wait on this
 * thread while nothing else is pending here.
 */

/// <reference lib="deno.worker" />

import { drainEventfd, EventLoop, nextTurn, signalEventfd } from "./event_loop.ts";
import { pinnedCalls, sysClose, sysEventfd, sysSetThreadNice } from "./sys/libc.ts";
import { GuestMemory } from "./memory.ts";
import { FileBackend } from "./block_file.ts";
import { Tap } from "./tap.ts";
import type { DeviceSpec, FromWorker, InterruptRoute, QueueState, ToWorker } from "./device_thread.ts";
import type { VirtioDevice, VirtioInterrupt } from "../devices/virtio/device.ts";
import { SplitQueue, VIRTIO_F_VERSION_1 } from "../devices/virtio/queue.ts";
import { VirtioBlk } from "../devices/virtio/blk.ts";
import { VirtioRng } from "../devices/virtio/rng.ts";
import { VirtioNet } from "../devices/virtio/net.ts";
import { INT_USED_RING } from "../transports/virtio_core.ts";
import { PLAN, VIRTIO_MSI_NO_VECTOR } from "../transports/pci.ts";
import { followIsr } from "./isr_line.ts";
import { LoopbackNet, RehearsalDriver, rehearsalSpec, rehearsedQueues, SCRATCH_BYTES } from "./rehearsal.ts";

// Timers set here (a rate limit's wait, a queue's next pass) need the V8 event loop: while
// any is pending the loop waits through the blocking pool instead of blocking this thread.
const timers = new Set<unknown>();
const g = globalThis as any;
const realSetTimeout = g.setTimeout;
const realClearTimeout = g.clearTimeout;
g.setTimeout = (fn: (...a: unknown[]) => void, ms?: number, ...args: unknown[]) => {
  const id = realSetTimeout(() => {
    timers.delete(id);
    fn(...args);
  }, ms);
  timers.add(id);
  return id;
};
g.clearTimeout = (id?: unknown) => {
  timers.delete(id);
  realClearTimeout(id);
};

interface Entry {
  kind: DeviceSpec["kind"];
  device: VirtioDevice;
  irq: VirtioInterrupt;
  active: boolean;
  queues: SplitQueue[];
  split: RequestSplit;
  /** A rehearsal's twin (rehearsal.ts), not a guest's device. */
  twin: boolean;
  /** Takes its fds out of the loop. */
  unwatch: Array<() => void>;
}

/** One kind of span: how many, and the latest 256 of them (ms) for a median. */
class Spans {
  n = 0;
  private readonly last = new Float64Array(256);

  /** Adds the time from `since` (if set) to `t`. */
  add(since: number, t: number): void {
    if (since < 0) return;
    this.last[this.n++ % this.last.length] = t - since;
  }

  /**
   * The median of the latest spans in us with the count of all, then their 90th percentile
   * and mean (the tail a median hides), e.g. `412 (1800) p90=900 mean=610`.
   */
  describe(): string {
    if (this.n === 0) return "- (0)";
    const xs = this.last.slice(0, Math.min(this.n, this.last.length)).sort();
    const us = (ms: number) => (ms * 1000).toFixed(0);
    const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
    return `${us(xs[xs.length >> 1])} (${this.n}) p90=${us(xs[Math.floor(xs.length * 0.9)])} mean=${
      us(mean)
    }`;
  }
}

/**
 * Where a device's one-at-a-time requests spend their time, seen from this thread: from a
 * doorbell to the interrupt it led to (this side: the device's code and its backend), and
 * from that interrupt to the next doorbell (the other side: the interrupt's way into the
 * guest, the guest's handler and its next request, the notify exit through the ioeventfd
 * and this thread's wake-up). Only alternating doorbell/interrupt pairs count, so with
 * several requests in flight the figures cover the pairs that alternated. Each is reported
 * as the median of the latest 256 (the last phase that used the device, not the idle gaps
 * between phases a mean would take in).
 */
class RequestSplit {
  private doorbellAt = -1;
  private interruptAt = -1;
  private readonly host = new Spans();
  private readonly guest = new Spans();

  doorbell(): void {
    const t = performance.now();
    this.guest.add(this.interruptAt, t);
    this.interruptAt = -1;
    if (this.doorbellAt < 0) this.doorbellAt = t;
  }

  interrupt(): void {
    const t = performance.now();
    this.host.add(this.doorbellAt, t);
    this.doorbellAt = -1;
    this.interruptAt = t;
  }

  describe(): string {
    return `doorbell_to_irq_us=${this.host.describe()} irq_to_doorbell_us=${this.guest.describe()}`;
  }
}

const entries: Entry[] = [];
const inbox: ToWorker[] = [];
let taken = 0;
let control: Int32Array | undefined;
let controlFd = -1;
let memory: GuestMemory | undefined;
let loop: EventLoop | undefined;
/** What the thread's priority ended up as, for the reports. */
let priority = `nice=${threadNice()}`;

/** This thread's nice value, from /proc (field 19 of its stat line). */
function threadNice(): string {
  try {
    const stat = Deno.readTextFileSync("/proc/thread-self/stat");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16];
  } catch {
    return "?";
  }
}

const post = (m: FromWorker) => self.postMessage(m);

/**
 * The interrupt of one device: the shared ISR and line, or its queue's MSI-X vector. A line
 * that follows the ISR (virtio-MMIO) is raised here when a bit is set on a zero ISR; an
 * irqfd line's resample eventfd (PCI INTx) is watched here: raised again while the ISR is
 * not zero.
 */
function interruptFor(
  id: number,
  route: InterruptRoute,
  split: RequestSplit,
  needsReset: (reason: string) => void = (reason) => post({ op: "needsReset", id, reason }),
): VirtioInterrupt {
  const isr = new Int32Array(route.isr.buffer);
  const at = route.isr.index;
  const plan = route.msix ? new Int32Array(route.msix.plan) : undefined;
  const vectors = route.msix?.vectorFds ?? [];
  const { line, lineFd } = route;
  const resample = route.resampleFd;
  if (resample !== undefined && lineFd !== undefined) {
    loop!.add(resample, () => {
      if (!drainEventfd(resample) || Atomics.load(isr, at) === 0) return;
      if ((plan ? Atomics.load(plan, 0) : PLAN.LINE) === PLAN.LINE) signalEventfd(lineFd);
    });
  }
  return {
    signalUsed(q: number): void {
      split.interrupt();
      const mode = plan ? Atomics.load(plan, 0) : PLAN.LINE;
      if (mode === PLAN.MSIX) {
        const v = Atomics.load(plan!, 1 + q);
        if (v !== VIRTIO_MSI_NO_VECTOR && v < vectors.length) signalEventfd(vectors[v]);
        return;
      }
      const old = Atomics.or(isr, at, INT_USED_RING);
      if (mode !== PLAN.LINE) return;
      if (line) {
        if (old === 0) followIsr(line.vmFd, line.gsi, isr, at);
      } else if (lineFd !== undefined) signalEventfd(lineFd);
    },
    signalConfig: () => post({ op: "config", id }),
    needsReset,
  };
}

/** The guests' disks on this thread: their io_uring rings close when the thread stops. */
const disks: FileBackend[] = [];

function build(s: DeviceSpec, twin: boolean): VirtioDevice {
  switch (s.kind) {
    case "blk": {
      const disk = FileBackend.adopt(s.disk);
      // What cannot be made at once goes to an io_uring this loop reaps, not to the pool (a
      // rehearsal's reads of the image are always cached, so its twin needs no ring).
      if (!twin) {
        disk.attach(loop!);
        disks.push(disk);
      }
      return new VirtioBlk(disk, { serial: s.serial });
    }
    case "rng":
      return new VirtioRng({ fill: (b) => crypto.getRandomValues(b) }, s.opts);
    case "net": {
      // A twin's frames come back to it from memory: none reaches the guest's TAP.
      if (twin) return new VirtioNet(new LoopbackNet(), { mac: s.mac, mtu: s.mtu });
      const tap = Tap.open({ fd: s.tapFd });
      tap.attach(loop!);
      return new VirtioNet(tap, { mac: s.mac, mtu: s.mtu });
    }
  }
}

function init(m: Extract<ToWorker, { op: "init" }>): void {
  if (m.nice !== 0) {
    let refused = "";
    try {
      const e = sysSetThreadNice(m.nice);
      if (e !== 0) refused = ` (nice ${m.nice} refused, errno ${e})`;
      // It may raise its priority: a rehearsal can run at nice 19 and come back.
      else if (m.nice < 0) niceAfterRehearsal = m.nice;
    } catch (e) {
      refused = ` (nice ${m.nice} not set: ${(e as Error).message})`;
    }
    // What the thread runs at, read back (the process may have had a nice value already).
    priority = `nice=${threadNice()}${refused}`;
  }
  rehearsalRequests = m.rehearse;
  rehearsalBudgetMs = m.rehearseBudgetMs;
  rehearsalIdleBudgetMs = m.rehearseIdleBudgetMs;
  control = new Int32Array(m.control);
  const host = Deno.UnsafePointerView.getArrayBuffer(
    Deno.UnsafePointer.create(m.memory.base)!,
    m.memory.size,
  );
  memory = new GuestMemory(
    m.memory.regions.map((r) => ({ gpa: r.gpa, bytes: new Uint8Array(host, r.offset, r.size) })),
  );
  loop = new EventLoop({
    canBlock: () => inbox.length === 0 && pinnedCalls() === 0 && timers.size === 0,
    // No device waits on a promise: nothing queued by the handlers is left to run.
    settled: () => {
      for (const e of entries) if (e && e.device.pending! > 0) return false;
      for (const r of rehearsals) if (r.entry.device.pending! > 0) return false;
      return true;
    },
    // Messages first: a doorbell rung after DRIVER_OK must find the device started.
    beforeDispatch: (ready) => ready.includes(controlFd) ? takeMessages() : undefined,
  });
  loop.onError = (e) => post({ op: "error", message: e.stack ?? e.message });
  controlFd = m.controlFd;
  // Only wakes the loop: takeMessages drains it, then reads how many were posted.
  loop.add(controlFd, () => {});
  loop.start();
}

/**
 * Builds the device of `spec` and watches its doorbells. Edge-triggered: each notify wakes
 * this loop once, so the counter is never read (a system call less on every request's way
 * in). It only grows, by one per notify, and 2^64 notifies are out of reach.
 */
function addEntry(id: number, spec: DeviceSpec, route: InterruptRoute, notifyFds: number[]): Entry {
  const twin = id < 0;
  const split = new RequestSplit();
  const e: Entry = {
    kind: spec.kind,
    device: build(spec, twin),
    irq: interruptFor(id, route, split, twin ? (why) => void endRehearsalOf(e, why) : undefined),
    active: false,
    queues: [],
    split,
    twin,
    unwatch: [],
  };
  notifyFds.forEach((fd, q) =>
    e.unwatch.push(loop!.add(fd, () => {
      if (!e.active || !e.queues[q]?.ready) return;
      // The guest has started using its devices: a rehearsal still running ends here, so it
      // never competes with the guest's requests for this thread (on a slow host, such as a
      // nested one, 2,000 requests can take seconds; on a fast one they are long done).
      if (!e.twin && !guestStarted) {
        guestStarted = true;
        for (const r of rehearsals) void endRehearsal(r, "the guest started");
        loud();
      }
      split.doorbell();
      e.device.notify(q);
    }, { edge: true }))
  );
  return e;
}

/** DRIVER_OK: starts `e` on `queues`; returns why it could not start, if it could not. */
function activateEntry(
  e: Entry,
  features: bigint,
  queues: QueueState[],
  mem: GuestMemory,
): string | undefined {
  e.queues = queues.map((s) => Object.assign(new SplitQueue(s.maxSize), s));
  e.active = true;
  try {
    e.device.activate({ memory: mem, queues: e.queues, features, interrupt: e.irq });
  } catch (err) {
    e.active = false;
    return (err as Error).message;
  }
  return undefined;
}

/** A device kind's rehearsal in progress (rehearsal.ts). */
interface Rehearsal {
  entry: Entry;
  driver: RehearsalDriver;
  /** One doorbell per queue. */
  doorbells: number[];
  irqFd: number;
  isr: Int32Array;
  plan: Int32Array;
  served: number;
  startedAt: number;
  ending?: Promise<void>;
}

/** Requests each device kind is rehearsed with (0: none). */
let rehearsalRequests = 0;
/** The longest each rehearsal may run, in milliseconds: at the thread's priority, at nice 19. */
let rehearsalBudgetMs = 0;
let rehearsalIdleBudgetMs = 0;
const rehearsals = new Set<Rehearsal>();
/** Per device kind: how its rehearsal went, for the report. */
const rehearsed = new Map<string, string>();
/** The nice value to come back to after a rehearsal at nice 19 (set where allowed). */
let niceAfterRehearsal: number | undefined;
let quieted = false;
/** A guest's doorbell has rung: no rehearsal starts or goes on any more. */
let guestStarted = false;

/** Rehearsals run at nice 19 where the thread may come back: only idle CPU time. */
function quiet(): void {
  if (quieted || niceAfterRehearsal === undefined) return;
  quieted = sysSetThreadNice(19) === 0;
}

function loud(): void {
  if (!quieted) return;
  quieted = false;
  sysSetThreadNice(niceAfterRehearsal!);
}

/** Starts the rehearsal of `spec`'s kind unless one ran or runs already. */
function startRehearsal(spec: DeviceSpec): void {
  if (rehearsalRequests <= 0 || guestStarted || rehearsed.has(spec.kind)) return;
  const twin = rehearsalSpec(spec);
  if (!twin) return;
  rehearsed.set(spec.kind, "running");
  const doorbells = Array.from({ length: rehearsedQueues(twin) }, () => sysEventfd());
  const irqFd = sysEventfd();
  const isr = new Int32Array(new SharedArrayBuffer(4));
  // Interrupts alternate between the line's way and an MSI-X vector's, so both are warm: the
  // plan's mode, then each queue's vector (all 0, the one vector).
  const plan = new Int32Array(new SharedArrayBuffer(4 * (1 + doorbells.length)));
  const route: InterruptRoute = {
    isr: { buffer: isr.buffer as SharedArrayBuffer, index: 0 },
    lineFd: irqFd,
    msix: { plan: plan.buffer as SharedArrayBuffer, vectorFds: [irqFd] },
  };
  const entry = addEntry(-1, twin, route, doorbells);
  const features = entry.device.features | (1n << VIRTIO_F_VERSION_1);
  const driver = new RehearsalDriver(
    twin,
    new Uint8Array(SCRATCH_BYTES),
    features,
    entry.device.queueMaxSizes,
  );
  const r: Rehearsal = {
    entry,
    driver,
    doorbells,
    irqFd,
    isr,
    plan,
    served: 0,
    startedAt: performance.now(),
  };
  rehearsals.add(r);
  entry.unwatch.push(loop!.add(irqFd, () => rehearsalStep(r)));
  const queues = entry.device.queueMaxSizes.map((max, i) => driver.queue(i, max));
  const why = activateEntry(entry, features, queues, driver.memory);
  if (why) return void endRehearsal(r, why);
  quiet();
  for (const q of driver.post()) signalEventfd(doorbells[q]);
}

/** The twin interrupted: take its answer and post the next request, or end. */
function rehearsalStep(r: Rehearsal): void {
  drainEventfd(r.irqFd);
  Atomics.store(r.isr, 0, 0); // as a driver's ISR read would
  const n = r.driver.takeUsed();
  if (n < 0) return void endRehearsal(r, "a request came back wrong");
  r.served += n;
  if (r.served >= rehearsalRequests) return void endRehearsal(r);
  const budget = quieted ? rehearsalIdleBudgetMs : rehearsalBudgetMs;
  if (performance.now() - r.startedAt > budget) return void endRehearsal(r, "out of time");
  if (r.driver.inFlight > 0) return;
  Atomics.store(r.plan, 0, r.served & 1 ? PLAN.MSIX : PLAN.LINE);
  for (const q of r.driver.post()) signalEventfd(r.doorbells[q]);
}

function endRehearsalOf(e: Entry, why: string): Promise<void> {
  for (const r of rehearsals) if (r.entry === e) return endRehearsal(r, why);
  return Promise.resolve();
}

/**
 * Ends a rehearsal: its fds leave the loop, its twin is reset (waiting for a transfer still
 * in flight) and the fds are closed. With none left the thread goes back to its priority.
 */
function endRehearsal(r: Rehearsal, why?: string): Promise<void> {
  r.ending ??= (async () => {
    const ms = performance.now() - r.startedAt;
    for (const u of r.entry.unwatch) u();
    r.entry.active = false;
    await r.entry.device.reset();
    for (const fd of r.doorbells) sysClose(fd);
    sysClose(r.irqFd);
    rehearsals.delete(r);
    rehearsed.set(
      r.entry.kind,
      `${r.served}/${rehearsalRequests},${ms.toFixed(0)}ms${why ? `,${why.replaceAll(" ", "_")}` : ""}`,
    );
    if (rehearsals.size === 0) loud();
  })();
  return r.ending;
}

/** Acts on one message. Nothing here waits: answers that must wait are posted when ready. */
function take(m: ToWorker): void {
  switch (m.op) {
    case "init":
      return init(m);
    case "add": {
      entries[m.id] = addEntry(m.id, m.spec, m.route, m.notifyFds);
      startRehearsal(m.spec);
      return;
    }
    case "activate": {
      const e = entries[m.id];
      const why = activateEntry(e, m.features, m.queues, memory!);
      if (why) post({ op: "needsReset", id: m.id, reason: `activation failed: ${why}` });
      return;
    }
    case "reset": {
      const e = entries[m.id];
      e.active = false;
      const done = () => post({ op: "done", seq: m.seq });
      void Promise.resolve(e.device.reset()).then(done, (err) => {
        post({ op: "error", message: `reset: ${(err as Error).message}` });
        done();
      });
      return;
    }
    case "describe":
      post({
        op: "done",
        seq: m.seq,
        value: entries.map((e) => {
          const qs = e.queues.map((q, i) => `q${i}: avail=${q.nextAvail} used=${q.nextUsed}`).join(" ");
          return `${qs}${
            e.device.describe ? ` ${e.device.describe()}` : ""
          } ${e.split.describe()} ${priority} warmup=${rehearsed.get(e.kind) ?? "none"}`;
        }),
      });
      return;
    case "stop":
      void Promise.all([...rehearsals].map((r) => endRehearsal(r, "stopped")))
        .then(() => loop!.stop())
        .then(() => {
          // Every device was reset before (so nothing is in flight); detach would wait.
          for (const d of disks.splice(0)) d.detach();
          post({ op: "done", seq: m.seq });
        });
      return;
  }
}

/** Takes every message the main thread posted before the wake that got us here. */
async function takeMessages(): Promise<void> {
  if (!control) return;
  // Drain first, count second: a message counted after this drain comes with a new signal.
  drainEventfd(controlFd);
  const posted = Atomics.load(control, 0);
  while (taken < posted) {
    // Posted messages arrive as events: let the event loop deliver them.
    while (inbox.length === 0) await nextTurn();
    taken++;
    const m = inbox.shift()!;
    try {
      take(m);
    } catch (err) {
      post({ op: "error", message: (err as Error).stack ?? String(err) });
      // Whoever waits for an answer gets one: a failed step must not hang a vCPU or teardown.
      if ("seq" in m) post({ op: "done", seq: m.seq });
    }
  }
}

self.onmessage = (e: MessageEvent<ToWorker>) => {
  if (e.data.op === "init") {
    // The first message: there is no loop yet to take it.
    taken++;
    init(e.data);
  } else inbox.push(e.data);
};
