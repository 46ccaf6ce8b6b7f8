/**
 * The device thread: virtio queue work on a Worker that blocks in epoll_wait itself, so a
 * doorbell (ioeventfd) wakes the thread that serves it and the answer leaves as an irqfd
 * write from there, with no hop through the main thread's V8 event loop or Deno's blocking
 * pool (docs/PERFORMANCE.md). The main thread keeps everything a vCPU exit reaches: the
 * register files, status, features, config space and queue setup. What crosses over is
 * what vhost gives a backend: at DRIVER_OK the negotiated features and each queue's
 * addresses; the queues' doorbell eventfds; and how to interrupt (the ISR cell and its line,
 * or the MSI-X vector irqfds, chosen per interrupt from the transport's shared plan).
 *
 * On the main thread a device is a `RemoteDevice`: config reads and writes go to a local
 * twin of the device (same backend, never activated), activate/reset/notify go to the
 * worker. Messages are posted, then an eventfd in the worker's epoll is signalled; the
 * worker takes every posted message before it looks at any doorbell, so a notify after
 * DRIVER_OK always finds the device activated.
 */

import type { VirtioDevice } from "../devices/virtio/device.ts";
import type { ActivateContext } from "../devices/virtio/device.ts";
import type { SharedDisk } from "./block_file.ts";
import type { RngOptions } from "../devices/virtio/rng.ts";
import type { IsrLine } from "./isr_line.ts";
import { signalEventfd } from "./event_loop.ts";
import { sysClose, sysEventfd } from "./sys/libc.ts";
import { REHEARSAL_BUDGET_MS, REHEARSAL_IDLE_BUDGET_MS, rehearsalRequests } from "./rehearsal.ts";

/** What the worker builds a device from (structured-cloneable). */
export type DeviceSpec =
  | { kind: "blk"; disk: SharedDisk; serial?: string }
  | { kind: "rng"; opts: Pick<RngOptions, "maxRequestBytes" | "rateBytesPerSec"> }
  | { kind: "net"; tapFd: number; mac: Uint8Array; mtu?: number };

/** How the worker interrupts the driver of one device. */
export interface InterruptRoute {
  /** The ISR cell: its buffer and Int32 index. */
  isr: { buffer: SharedArrayBuffer; index: number };
  /**
   * A line that follows the ISR (virtio-MMIO, vmm/isr_line.ts): set with KVM_IRQ_LINE here
   * when a bit is set and the ISR was zero.
   */
  line?: IsrLine;
  /** Otherwise the line's irqfd (PCI INTx). */
  lineFd?: number;
  /**
   * The line's resample eventfd (the guest's EOI): the device thread raises the line again
   * while the ISR is not zero (level-triggered, like the register it mirrors).
   */
  resampleFd?: number;
  /** PCI only: the transport's plan (transports/pci.ts PLAN) and each MSI-X vector's eventfd. */
  msix?: { plan: SharedArrayBuffer; vectorFds: readonly number[] };
}

/** Guest RAM as the worker maps it: one host mapping, regions at offsets in it. */
export interface SharedMemoryLayout {
  /** Host address of the mapping. */
  base: bigint;
  /** Its size. */
  size: number;
  /** Guest regions: guest physical address, offset in the mapping, size. */
  regions: Array<{ gpa: number; offset: number; size: number }>;
}

/** One queue's state at DRIVER_OK. */
export interface QueueState {
  /** Fields of SplitQueue. */
  maxSize: number;
  /** Size. */
  size: number;
  /** Enabled. */
  ready: boolean;
  /** Ring addresses. */
  descAddr: number;
  /** Available ring. */
  availAddr: number;
  /** Used ring. */
  usedAddr: number;
  /** Ring positions. */
  nextAvail: number;
  /** Used position. */
  nextUsed: number;
  /** VIRTIO_F_INDIRECT_DESC. */
  indirect: boolean;
  /** VIRTIO_F_EVENT_IDX. */
  eventIdx: boolean;
}

/** Messages to the worker. */
export type ToWorker =
  | {
    op: "init";
    memory: SharedMemoryLayout;
    control: SharedArrayBuffer;
    controlFd: number;
    nice: number;
    rehearse: number;
    rehearseBudgetMs: number;
    rehearseIdleBudgetMs: number;
  }
  | { op: "add"; id: number; spec: DeviceSpec; notifyFds: number[]; route: InterruptRoute }
  | { op: "activate"; id: number; features: bigint; queues: QueueState[] }
  | { op: "reset"; id: number; seq: number }
  | { op: "describe"; seq: number }
  | { op: "stop"; seq: number };

/** Messages from the worker. */
export type FromWorker =
  | { op: "done"; seq: number; value?: unknown }
  | { op: "needsReset"; id: number; reason: string }
  | { op: "config"; id: number }
  | { op: "error"; message: string };

/**
 * The device thread's nice value (TSVMM_DEVICE_NICE, default -10; 0 leaves it alone). Every
 * request waits for this thread to be woken, and on a busy CPU a thread at the default
 * priority can wait milliseconds behind another before the scheduler preempts it. A negative
 * value needs CAP_SYS_NICE; without it the thread stays at 0 and its report says so.
 */
export const DEVICE_THREAD_NICE: number = niceFrom(Deno.env.get("TSVMM_DEVICE_NICE"));

/** A nice value from the environment: an integer clamped to Linux's -20..19, else -10. */
function niceFrom(v: string | undefined): number {
  const n = Number(v ?? "-10");
  return Number.isInteger(n) ? Math.min(19, Math.max(-20, n)) : -10;
}

/** The main thread's end of the device thread. */
export class DeviceThread {
  private readonly worker: Worker;
  /** [0]: messages posted so far (the worker counts what it took). */
  private readonly control = new Int32Array(new SharedArrayBuffer(4));
  private readonly controlFd = sysEventfd();
  private seq = 0;
  private readonly waiting = new Map<number, (v: unknown) => void>();
  private readonly devices: RemoteDevice[] = [];
  private stopped: Promise<void> | undefined;
  private dead = false;
  /**
   * Worker errors, reported once each: a device's (the thread goes on) or the worker's own
   * death (see `died`).
   */
  onError: (message: string) => void = (m) => console.error(`device thread: ${m}`);

  /**
   * Starts the worker over guest RAM laid out as `memory`. The worker raises its own
   * priority to `nice` where the process may (see DEVICE_THREAD_NICE), and warms its code up
   * with `rehearse` requests per device kind (vmm/rehearsal.ts; 0: none), each kind's for at
   * most `rehearseBudgetMs` milliseconds, or `rehearseIdleBudgetMs` where it runs at nice 19.
   */
  constructor(
    memory: SharedMemoryLayout,
    nice: number = DEVICE_THREAD_NICE,
    rehearse: number = rehearsalRequests(),
    rehearseBudgetMs: number = REHEARSAL_BUDGET_MS,
    rehearseIdleBudgetMs: number = REHEARSAL_IDLE_BUDGET_MS,
  ) {
    this.worker = new Worker(new URL("./device_worker.ts", import.meta.url), { type: "module" });
    this.worker.onmessage = (e: MessageEvent<FromWorker>) => this.receive(e.data);
    this.worker.onerror = (e) => {
      e.preventDefault();
      this.onError(e.message);
      // A Worker that threw is gone: nothing waits on it forever (resets, teardown).
      this.dead = true;
      this.worker.terminate();
      for (const w of this.waiting.values()) w(undefined);
      this.waiting.clear();
    };
    this.post({
      op: "init",
      memory,
      control: this.control.buffer as SharedArrayBuffer,
      controlFd: this.controlFd,
      nice,
      rehearse,
      rehearseBudgetMs,
      rehearseIdleBudgetMs,
    });
  }

  private receive(m: FromWorker): void {
    switch (m.op) {
      case "done": {
        const w = this.waiting.get(m.seq);
        this.waiting.delete(m.seq);
        w?.(m.value);
        break;
      }
      case "needsReset":
        this.devices[m.id]?.interrupt?.needsReset(m.reason);
        break;
      case "config":
        this.devices[m.id]?.interrupt?.signalConfig();
        break;
      case "error":
        this.onError(m.message);
        break;
    }
  }

  /**
   * Whether the worker died (an error nothing in it caught). Whatever it had started may
   * still be running: transfers on its io_uring or on Deno's blocking pool, into guest RAM
   * and on the images' fd numbers. Teardown then keeps both from being reused (builder.ts).
   */
  get died(): boolean {
    return this.dead;
  }

  /** Posts `m` and wakes the worker to take it. */
  post(m: ToWorker): void {
    this.worker.postMessage(m);
    Atomics.add(this.control, 0, 1);
    signalEventfd(this.controlFd);
  }

  /** Posts a request; resolves with the worker's answer. */
  request(m: { op: "reset"; id: number } | { op: "describe" } | { op: "stop" }): Promise<unknown> {
    if (this.dead) return Promise.resolve(undefined);
    const seq = ++this.seq;
    const p = new Promise<unknown>((r) => this.waiting.set(seq, r));
    this.post({ ...m, seq } as ToWorker);
    return p;
  }

  /** A main-thread stand-in for a device the worker builds from `spec`; `local` answers config. */
  remote(local: VirtioDevice, spec: DeviceSpec): RemoteDevice {
    const d = new RemoteDevice(this, this.devices.length, local, spec);
    this.devices.push(d);
    return d;
  }

  /** Asks the worker for every device's report line and keeps them for `describe()`. */
  async refresh(): Promise<void> {
    if (this.stopped) return;
    const lines = (await this.request({ op: "describe" }) ?? []) as string[];
    lines.forEach((l, i) => this.devices[i] && (this.devices[i].lastReport = l));
  }

  /**
   * Stops the worker: call after every device was reset (nothing of the guest's is touched
   * afterwards). The fds the devices used stay open for their owners to close.
   */
  stop(): Promise<void> {
    this.stopped ??= (async () => {
      try {
        await this.refresh();
      } catch { /* the report stays as it was */ }
      await this.request({ op: "stop" });
      this.worker.terminate();
      sysClose(this.controlFd);
    })();
    return this.stopped;
  }
}

/** A device served by the device thread, as the main thread's transports see it. */
export class RemoteDevice implements VirtioDevice {
  /** Virtio device ID. */
  readonly deviceType: number;
  /** Name for logs. */
  readonly name: string;
  /** Offered features. */
  readonly features: bigint;
  /** Queue sizes. */
  readonly queueMaxSizes: readonly number[];
  /** The worker's last report line for this device. */
  lastReport = "";
  /** Interrupts of the transport (for what the worker asks the main thread to do). */
  interrupt: ActivateContext["interrupt"] | undefined;
  private notifyFds: number[] = [];
  private active = false;
  private quiet: Promise<void> | undefined;

  /** Made by DeviceThread.remote. */
  constructor(
    private readonly thread: DeviceThread,
    readonly id: number,
    private readonly local: VirtioDevice,
    private readonly spec: DeviceSpec,
  ) {
    this.deviceType = local.deviceType;
    this.name = local.name;
    this.features = local.features;
    this.queueMaxSizes = local.queueMaxSizes;
  }

  /**
   * Hands the device to the worker once its transport is placed: the worker watches
   * `notifyFds` (queue i's doorbell eventfd) and interrupts through `route`.
   */
  bind(notifyFds: number[], route: InterruptRoute): void {
    this.notifyFds = notifyFds;
    this.thread.post({ op: "add", id: this.id, spec: this.spec, notifyFds, route });
  }

  /** Config space: the local twin. */
  readConfig(offset: number, data: Uint8Array): void {
    this.local.readConfig(offset, data);
  }

  /** Config space: the local twin. */
  writeConfig(offset: number, data: Uint8Array): void {
    this.local.writeConfig(offset, data);
  }

  /** DRIVER_OK: the worker starts the device on these queues. */
  activate(ctx: ActivateContext): void {
    this.interrupt = ctx.interrupt;
    this.active = true;
    const queues = ctx.queues.map((q) => ({
      maxSize: q.maxSize,
      size: q.size,
      ready: q.ready,
      descAddr: q.descAddr,
      availAddr: q.availAddr,
      usedAddr: q.usedAddr,
      nextAvail: q.nextAvail,
      nextUsed: q.nextUsed,
      indirect: q.indirect,
      eventIdx: q.eventIdx,
    }));
    this.thread.post({ op: "activate", id: this.id, features: ctx.features, queues });
  }

  /** A notify that came through a register write: rung on the doorbell the worker watches. */
  notify(index: number): void {
    const fd = this.notifyFds[index];
    if (fd !== undefined) signalEventfd(fd);
  }

  /**
   * Stops the device in the worker; the promise settles when none of its work can touch
   * guest RAM. A device not started since its last reset answers at once (or with that
   * reset's promise while it is still settling).
   */
  reset(): void | Promise<void> {
    if (this.active) {
      this.active = false;
      const quiet: Promise<void> = this.thread.request({ op: "reset", id: this.id }).then(() => {
        if (this.quiet === quiet) this.quiet = undefined;
      });
      this.quiet = quiet;
    }
    return this.quiet;
  }

  /** The worker's report (refreshed in the background on each call). */
  describe(): string {
    this.thread.refresh().catch(() => {});
    return `thread: ${this.lastReport}`;
  }
}
