/**
 * The device thread's Worker (device_thread.ts): builds each device from its spec, watches
 * the doorbells, and runs the devices on an event loop that blocks in epoll_wait on this
 * thread while nothing else is pending here.
 */

/// <reference lib="deno.worker" />

import { drainEventfd, EventLoop, nextTurn, signalEventfd } from "./event_loop.ts";
import { pinnedCalls, sysSetThreadNice } from "./sys/libc.ts";
import { GuestMemory } from "./memory.ts";
import { FileBackend } from "./block_file.ts";
import { Tap } from "./tap.ts";
import type { FromWorker, InterruptRoute, ToWorker } from "./device_thread.ts";
import type { VirtioDevice, VirtioInterrupt } from "../devices/virtio/device.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import { VirtioBlk } from "../devices/virtio/blk.ts";
import { VirtioRng } from "../devices/virtio/rng.ts";
import { VirtioNet } from "../devices/virtio/net.ts";
import { INT_USED_RING } from "../transports/virtio_core.ts";
import { PLAN, VIRTIO_MSI_NO_VECTOR } from "../transports/pci.ts";
import { followIsr } from "./isr_line.ts";

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
  device: VirtioDevice;
  irq: VirtioInterrupt;
  active: boolean;
  queues: SplitQueue[];
  split: RequestSplit;
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
function interruptFor(id: number, route: InterruptRoute, split: RequestSplit): VirtioInterrupt {
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
    needsReset: (reason) => post({ op: "needsReset", id, reason }),
  };
}

function build(m: Extract<ToWorker, { op: "add" }>): VirtioDevice {
  const s = m.spec;
  switch (s.kind) {
    case "blk":
      return new VirtioBlk(FileBackend.adopt(s.disk), { serial: s.serial });
    case "rng":
      return new VirtioRng({ fill: (b) => crypto.getRandomValues(b) }, s.opts);
    case "net": {
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
    } catch (e) {
      refused = ` (nice ${m.nice} not set: ${(e as Error).message})`;
    }
    // What the thread runs at, read back (the process may have had a nice value already).
    priority = `nice=${threadNice()}${refused}`;
  }
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
    settled: () => entries.every((e) => !(e.device.pending! > 0)),
    // Messages first: a doorbell rung after DRIVER_OK must find the device started.
    beforeDispatch: (ready) => ready.includes(controlFd) ? takeMessages() : undefined,
  });
  loop.onError = (e) => post({ op: "error", message: e.stack ?? e.message });
  controlFd = m.controlFd;
  // Only wakes the loop: takeMessages drains it, then reads how many were posted.
  loop.add(controlFd, () => {});
  loop.start();
}

/** Acts on one message. Nothing here waits: answers that must wait are posted when ready. */
function take(m: ToWorker): void {
  switch (m.op) {
    case "init":
      return init(m);
    case "add": {
      const device = build(m);
      const split = new RequestSplit();
      const e: Entry = { device, irq: interruptFor(m.id, m.route, split), active: false, queues: [], split };
      entries[m.id] = e;
      // Edge-triggered doorbells: each notify wakes this loop once, so the counter is never
      // read (a system call less on every request's way in). It only grows, by one per
      // notify, and 2^64 notifies are out of reach.
      m.notifyFds.forEach((fd, q) =>
        loop!.add(fd, () => {
          if (!e.active || !e.queues[q]?.ready) return;
          split.doorbell();
          e.device.notify(q);
        }, { edge: true })
      );
      return;
    }
    case "activate": {
      const e = entries[m.id];
      e.queues = m.queues.map((s) => Object.assign(new SplitQueue(s.maxSize), s));
      e.active = true;
      try {
        e.device.activate({ memory: memory!, queues: e.queues, features: m.features, interrupt: e.irq });
      } catch (err) {
        e.active = false;
        post({ op: "needsReset", id: m.id, reason: `activation failed: ${(err as Error).message}` });
      }
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
          } ${e.split.describe()} ${priority}`;
        }),
      });
      return;
    case "stop":
      void loop!.stop().then(() => post({ op: "done", seq: m.seq }));
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
