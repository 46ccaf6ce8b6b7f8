/**
 * An epoll loop of fd handlers (ioeventfds, resample eventfds, TAPs). Two ways to wait:
 *
 * - on the main thread, one epoll_wait at a time runs on Deno's blocking pool and the
 *   handlers of the ready fds run when the V8 event loop picks the result up;
 * - on a thread of its own (the device thread, device_worker.ts), the loop blocks in
 *   epoll_wait itself whenever nothing else is pending there (no nonblocking FFI call in
 *   flight, no timer set: `canBlock`), so a doorbell wakes the handler's thread directly.
 *   Otherwise it waits the first way, so those promises and timers still run.
 *
 * A private eventfd wakes the loop to stop it.
 */

import { errno, libc, pinnedCall, sysClose, SysError, sysEventfd } from "./sys/libc.ts";

const EPOLL_CLOEXEC = 0o2000000;
const EPOLL_CTL_ADD = 1;
const EPOLL_CTL_DEL = 2;
const EPOLL_CTL_MOD = 3;
/** epoll: readable. */
export const EPOLLIN = 0x001;
/** epoll: writable. */
export const EPOLLOUT = 0x004;
/** epoll: an error on the fd (always reported while the fd is watched). */
export const EPOLLERR = 0x008;
/** epoll: hang-up (always reported while the fd is watched). */
export const EPOLLHUP = 0x010;
/** epoll: edge-triggered, reported once per change rather than while the state lasts. */
export const EPOLLET = 0x80000000;
const EVENT_SIZE = 12; // struct epoll_event is packed on x86-64
const MAX_EVENTS = 64;
const STOP_TOKEN = 0;

/** Reads (and so clears) an eventfd's counter; returns 0 if it was not signalled. */
export function drainEventfd(fd: number): number {
  const n = Number(libc().read_buf(fd, COUNTER, 8n));
  return n === 8 ? Number(COUNTER[0]) : 0;
}

/** Adds 1 to an eventfd's counter. */
export function signalEventfd(fd: number): void {
  libc().write_buf(fd, ONE, 8n);
}

// The counters' buffers, made once per thread: an eventfd is read or written on every
// doorbell and interrupt, and a fresh ArrayBuffer each time cost more than the system call
// (about 4 us each, and work for V8's helper threads).
const COUNTER = new BigUint64Array(1);
const ONE = new BigUint64Array([1n]);

/** One fd watched for a set of events that can change. */
export interface FdWatch {
  /** Watches for `events` (EPOLLIN | EPOLLOUT ...); 0 takes the fd out of epoll. */
  set(events: number): void;
  /** Stops watching for good. */
  close(): void;
}

/** How an EventLoop waits (see the module comment). */
export interface EventLoopOptions {
  /**
   * Whether the loop may block its thread in epoll_wait now. Only for a loop on a thread
   * of its own; undefined (the main thread's loop) never blocks.
   */
  canBlock?: () => boolean;
  /**
   * Runs after each wake, before the handlers, with the fds that are ready (the device
   * thread takes its messages here). A returned promise is awaited.
   */
  beforeDispatch?: (ready: number[]) => void | Promise<void>;
  /**
   * Only for a loop that can block: whether everything its handlers started has finished,
   * so no promise continuation is left to run (no request in flight). Then the loop goes
   * back to epoll_wait at once after a wake in which `beforeDispatch` returned nothing,
   * instead of first letting the V8 event loop turn (a setImmediate, about 3.5 us of a
   * 16 us virtio-rng request on the device thread here). Undefined: never.
   */
  settled?: () => boolean;
}

const setImmediate = (globalThis as unknown as { setImmediate: (fn: () => void) => void }).setImmediate;

/**
 * Resolves on the event loop's next turn: after every queued promise continuation, with
 * the messages and I/O that arrived meanwhile delivered (about 3 us; setTimeout(0) is
 * clamped to milliseconds).
 */
export function nextTurn(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

/** An epoll-based loop of fd handlers. */
export class EventLoop {
  private readonly epfd: number;
  private readonly stopFd: number;
  private readonly handlers = new Map<number, { fd: number; fn: (events: number) => void }>();
  private readonly flushes = new Set<() => boolean>();
  private nextToken = 1;
  private running: Promise<void> | undefined;
  private stopping = false;
  private closed = false;
  private readonly events = new Uint8Array(EVENT_SIZE * MAX_EVENTS);
  /** Handler errors, reported once each to this callback (the loop keeps going). */
  onError: (e: Error) => void = (e) => console.error(`event loop: ${e.message}`);

  /** Creates the epoll instance. */
  constructor(private readonly opts: EventLoopOptions = {}) {
    this.epfd = libc().epoll_create1(EPOLL_CLOEXEC);
    if (this.epfd < 0) throw new SysError("epoll_create1", errno());
    this.stopFd = sysEventfd();
    this.ctl(EPOLL_CTL_ADD, this.stopFd, STOP_TOKEN);
  }

  private ctl(op: number, fd: number, token: number, events = EPOLLIN): void {
    // After stop() the epoll fd is gone (its number may even be reused): watchers that let
    // go of their fds while the VM is torn down have nothing left to change.
    if (this.closed) return;
    const ev = new Uint8Array(EVENT_SIZE);
    const dv = new DataView(ev.buffer);
    dv.setUint32(0, events, true);
    dv.setBigUint64(4, BigInt(token), true);
    if (libc().epoll_ctl(this.epfd, op, fd, ev) < 0) throw new SysError("epoll_ctl", errno());
  }

  /**
   * Calls `fn` whenever `fd` is readable (the handler must drain it). With `edge`, `fn` is
   * called once per signal instead and need not read the fd: for an eventfd, every write
   * that arrives after the loop last took the fd's event wakes it again, whatever the
   * counter holds. Returns a remover.
   */
  add(fd: number, fn: () => void, opts: { edge?: boolean } = {}): () => void {
    const w = this.watch(fd, () => fn());
    w.set(opts.edge ? EPOLLIN | EPOLLET : EPOLLIN);
    return () => w.close();
  }

  /**
   * Watches `fd` for a changing set of events (none at first); `fn` gets the events that
   * occurred. Epoll is level-triggered: the handler must consume what it is told about
   * or stop watching for it.
   */
  watch(fd: number, fn: (events: number) => void): FdWatch {
    const token = this.nextToken++;
    let current = 0;
    const set = (events: number) => {
      if (events === current) return;
      if (current === 0) {
        this.handlers.set(token, { fd, fn });
        this.ctl(EPOLL_CTL_ADD, fd, token, events);
      } else if (events === 0) {
        this.handlers.delete(token);
        this.ctl(EPOLL_CTL_DEL, fd, token);
      } else {
        this.ctl(EPOLL_CTL_MOD, fd, token, events);
      }
      current = events;
    };
    return { set, close: () => set(0) };
  }

  /**
   * Calls `fn` after each pass over the ready fds and before each wait: for work the
   * handlers queue to hand over together (an io_uring's submissions). `fn` returns true when
   * it left work to promise continuations (calls to make another way), which must run
   * before the loop may block. Returns a remover.
   */
  addFlush(fn: () => boolean | void): () => void {
    const f = () => fn() === true;
    this.flushes.add(f);
    return () => this.flushes.delete(f);
  }

  /** Runs every flush; true when one left work to promise continuations. */
  private flush(): boolean {
    let more = false;
    for (const f of this.flushes) {
      try {
        if (f()) more = true;
      } catch (e) {
        this.onError(e as Error);
      }
    }
    return more;
  }

  /** Starts dispatching. */
  start(): void {
    this.running ??= this.loop();
  }

  private async loop(): Promise<void> {
    const events = this.events;
    const at = Deno.UnsafePointer.of(events);
    const dv = new DataView(events.buffer);
    const { canBlock: block, beforeDispatch, settled } = this.opts;
    // Tokens are small counters: the low half of epoll_data is the whole token.
    const tokenOf = (i: number) => dv.getUint32(i * EVENT_SIZE + 4, true);
    // Whoever called start() gets its thread back before the first blocking wait.
    if (block) await nextTurn();
    while (!this.stopping) {
      let n: number;
      // What the last pass's promise continuations queued goes out before the wait; what a
      // flush refused is made another way by continuations, which must start (a pool call
      // then keeps the loop from blocking) before the loop decides how to wait.
      if (this.flush() && block) {
        await nextTurn();
        continue;
      }
      if (block?.()) {
        n = libc().epoll_wait(this.epfd, at, MAX_EVENTS, -1);
      } else {
        n = await pinnedCall([events], () => libc().epoll_wait_nb(this.epfd, at, MAX_EVENTS, -1));
      }
      if (n < 0) continue; // EINTR
      let waited = false;
      if (beforeDispatch) {
        const ready: number[] = [];
        for (let i = 0; i < n; i++) {
          const h = this.handlers.get(tokenOf(i));
          if (h) ready.push(h.fd);
        }
        const p = beforeDispatch(ready);
        if (p) {
          waited = true;
          await p;
        }
      }
      for (let i = 0; i < n; i++) {
        const token = tokenOf(i);
        const bits = dv.getUint32(i * EVENT_SIZE, true);
        if (token === STOP_TOKEN) continue;
        const h = this.handlers.get(token);
        if (!h) continue;
        try {
          h.fn(bits);
        } catch (e) {
          this.onError(e as Error);
        }
      }
      if (this.flush()) waited = true;
      // A blocking wait must not start before the work the handlers queued (promise
      // continuations) has run: unless nothing is left to run, let the event loop turn.
      if (block && (waited || !settled?.())) await nextTurn();
    }
  }

  /** Stops the loop and closes the epoll instance (the watched fds are their owners'). */
  async stop(): Promise<void> {
    this.stopping = true;
    signalEventfd(this.stopFd);
    if (this.running) await this.running;
    this.closed = true;
    this.handlers.clear();
    sysClose(this.epfd);
    sysClose(this.stopFd);
  }
}
