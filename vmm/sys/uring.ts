/**
 * An io_uring (Linux 5.1 and later) driven through FFI: disk reads, writes and syncs that
 * cannot be made at once are handed to the kernel from the thread that serves the device,
 * and their completions come back on an eventfd that thread's epoll loop watches. No call
 * goes through Deno's blocking pool, and the thread may block in epoll_wait while transfers
 * are in flight (a pool call in flight keeps it from blocking: event_loop.ts).
 *
 * The ring is small and private to one disk on one thread. At most `entries` operations are
 * in flight; the completion ring has twice as many slots (the kernel's default), so it can
 * never overflow. With `deferred` set, operations are queued in the submission ring and handed
 * to the kernel together by `flush()`: the device thread flushes once after each pass over
 * its ready fds and before it blocks, so the requests one doorbell brings cost one
 * io_uring_enter, not one each. Where the kernel refuses a ring (no io_uring, a seccomp filter, the
 * `kernel.io_uring_disabled` sysctl), `Uring.open` returns undefined and the caller keeps
 * using the pool.
 */

import { errno, mmapShared, sysClose, SysError, sysEventfd, sysMunmap } from "./libc.ts";
import type { Iovecs } from "./iovec.ts";

// System call arguments are 64-bit (bigint) throughout: syscall(2) passes whole registers.
const SYS_IO_URING_SETUP = 425n;
const SYS_IO_URING_ENTER = 426n;
const SYS_IO_URING_REGISTER = 427n;
const IORING_REGISTER_EVENTFD = 4n;
const IORING_ENTER_GETEVENTS = 1n;
const IORING_OFF_SQ_RING = 0n;
const IORING_OFF_CQ_RING = 0x8000000n;
const IORING_OFF_SQES = 0x10000000n;
const IORING_OP_READV = 1;
const IORING_OP_WRITEV = 2;
const IORING_OP_FSYNC = 3;
const IORING_OP_FALLOCATE = 17;
const IORING_FSYNC_DATASYNC = 1;
const SQE_BYTES = 64;
const CQE_BYTES = 16;
const PARAMS_BYTES = 120;
const EINTR = 4;

const SYMBOLS = {
  setup: { name: "syscall", parameters: ["i64", "i64", "buffer"], result: "i64" },
  enter: {
    name: "syscall",
    parameters: ["i64", "i64", "i64", "i64", "i64", "pointer", "i64"],
    result: "i64",
  },
  register: { name: "syscall", parameters: ["i64", "i64", "i64", "buffer", "i64"], result: "i64" },
} as const;

let sys: Deno.DynamicLibrary<typeof SYMBOLS>["symbols"] | undefined;
function calls(): Deno.DynamicLibrary<typeof SYMBOLS>["symbols"] {
  sys ??= Deno.dlopen("libc.so.6", SYMBOLS).symbols;
  return sys;
}

/**
 * What a deferred operation resolves with when the kernel refused its submission (no errno
 * is this low): the caller makes the call another way. The ring takes no more operations.
 */
export const RING_REFUSED = -1_000_000;

/** One operation in flight: how to settle it, and what its addresses point into. */
interface Pending {
  resolve: (res: number) => void;
  /** Kept referenced until the kernel is done with them (the iovec array, the buffers). */
  hold: readonly object[];
}

/** A mapping of the ring fd, with what unmaps it. */
interface Mapped {
  ptr: Deno.PointerObject;
  size: number;
  buf: ArrayBuffer;
}

function mapRing(fd: number, size: number, offset: bigint): Mapped {
  const ptr = mmapShared(fd, size, offset);
  return { ptr, size, buf: Deno.UnsafePointerView.getArrayBuffer(ptr, size) };
}

/** An io_uring with its completion eventfd. */
export class Uring {
  /** Signalled by the kernel when a completion is posted: watch it, then call `reap()`. */
  readonly eventFd: number;
  /** Most operations in flight at once. */
  readonly entries: number;
  /** Operations completed (for reports and tests). */
  completed = 0;
  /** io_uring_enter calls that submitted operations (for reports and tests). */
  enters = 0;
  /**
   * Queue operations until `flush()` instead of submitting each at once. Whoever sets it
   * must flush before waiting for a completion (`drain` and `close` flush themselves).
   */
  deferred = false;
  /** Operations queued in the submission ring and not yet handed to the kernel. */
  private queued = 0;
  private readonly sqHead: Uint32Array;
  private readonly sqTail: Uint32Array;
  private readonly sqMask: number;
  private readonly sqArray: Uint32Array;
  private readonly sqes: DataView;
  private readonly cqHead: Uint32Array;
  private readonly cqTail: Uint32Array;
  private readonly cqMask: number;
  private readonly cqes: DataView;
  private readonly cqesAt: number;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closed = false;
  private readonly fdArg: bigint;

  private constructor(
    private readonly fd: number,
    p: DataView,
    private readonly maps: Mapped[],
    eventFd: number,
  ) {
    this.eventFd = eventFd;
    this.fdArg = BigInt(fd);
    const [sq, cq, sqe] = maps;
    const u32 = (m: Mapped, at: number) => new Uint32Array(m.buf, at, 1);
    // struct io_sqring_offsets at 40, io_cqring_offsets at 80 of io_uring_params.
    this.entries = p.getUint32(0, true);
    this.sqHead = u32(sq, p.getUint32(40, true));
    this.sqTail = u32(sq, p.getUint32(44, true));
    this.sqMask = new Uint32Array(sq.buf, p.getUint32(48, true), 1)[0];
    this.sqArray = new Uint32Array(sq.buf, p.getUint32(64, true), this.entries);
    this.sqes = new DataView(sqe.buf);
    this.cqHead = u32(cq, p.getUint32(80, true));
    this.cqTail = u32(cq, p.getUint32(84, true));
    this.cqMask = new Uint32Array(cq.buf, p.getUint32(88, true), 1)[0];
    this.cqesAt = p.getUint32(100, true);
    this.cqes = new DataView(cq.buf);
  }

  /**
   * A ring of `entries` slots (a power of two up to 4096) with an eventfd registered for
   * its completions, or undefined (with the reason in `why`) where the kernel refuses one.
   */
  static open(entries = 64, why: { reason?: string } = {}): Uring | undefined {
    const params = new Uint8Array(PARAMS_BYTES);
    const fd = Number(calls().setup(SYS_IO_URING_SETUP, BigInt(entries), params));
    if (fd < 0) {
      why.reason = new SysError("io_uring_setup", errno()).message;
      return undefined;
    }
    const p = new DataView(params.buffer);
    const sqEntries = p.getUint32(0, true);
    const cqEntries = p.getUint32(4, true);
    const maps: Mapped[] = [];
    let eventFd = -1;
    try {
      maps.push(mapRing(fd, p.getUint32(64, true) + sqEntries * 4, IORING_OFF_SQ_RING));
      maps.push(mapRing(fd, p.getUint32(100, true) + cqEntries * CQE_BYTES, IORING_OFF_CQ_RING));
      maps.push(mapRing(fd, sqEntries * SQE_BYTES, IORING_OFF_SQES));
      eventFd = sysEventfd();
      const arg = new Int32Array([eventFd]);
      if (
        calls().register(
          SYS_IO_URING_REGISTER,
          BigInt(fd),
          IORING_REGISTER_EVENTFD,
          new Uint8Array(arg.buffer),
          1n,
        ) < 0
      ) {
        throw new SysError("io_uring_register(EVENTFD)", errno());
      }
    } catch (e) {
      for (const m of maps) sysMunmap(m.ptr, m.size);
      if (eventFd >= 0) sysClose(eventFd);
      sysClose(fd);
      why.reason = (e as Error).message;
      return undefined;
    }
    return new Uring(fd, p, maps, eventFd);
  }

  /** Operations submitted and not yet reaped. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Whether another operation can be submitted now (else use another way, or wait). */
  get hasRoom(): boolean {
    return !this.closed && this.pending.size < this.entries;
  }

  /** Whether the ring takes no more operations (closed, or a submission was refused). */
  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * preadv/pwritev of `count` entries of `iov` at `offset`: resolves with the bytes moved or
   * a negative errno. Undefined when the ring cannot take it (full, closed, or the kernel
   * refused the submission): the caller makes the transfer another way. A deferred ring
   * learns of a refusal at `flush()`: the operation then resolves with RING_REFUSED.
   */
  vectored(
    write: boolean,
    fd: number,
    iov: Iovecs,
    count: number,
    offset: number,
    hold: readonly object[],
  ): Promise<number> | undefined {
    const at = Number(Deno.UnsafePointer.value(iov.ptr));
    return this.submit(write ? IORING_OP_WRITEV : IORING_OP_READV, fd, at, count, offset, 0, [
      iov.words,
      ...hold,
    ]);
  }

  /** fdatasync: resolves with 0 or a negative errno; undefined as for `vectored`. */
  datasync(fd: number): Promise<number> | undefined {
    return this.submit(IORING_OP_FSYNC, fd, 0, 0, 0, IORING_FSYNC_DATASYNC, []);
  }

  /**
   * fallocate(fd, mode, offset, length) (Linux 5.6 and later): resolves with 0 or a negative
   * errno (-EINVAL from an older kernel that does not know the operation); undefined as for
   * `vectored`. The kernel reads the length from the address field and the mode from the
   * length field.
   */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<number> | undefined {
    return this.submit(IORING_OP_FALLOCATE, fd, length, mode, offset, 0, []);
  }

  private submit(
    op: number,
    fd: number,
    a: number,
    len: number,
    offset: number,
    flags: number,
    hold: readonly object[],
  ): Promise<number> | undefined {
    if (!this.hasRoom) return undefined;
    const tail = Atomics.load(this.sqTail, 0);
    // The slot at the tail is free: the kernel consumes every submitted entry during its
    // enter, queued ones are fewer than the ring's slots (hasRoom), and slot i holds SQE i.
    const slot = tail & this.sqMask;
    const s = this.sqes;
    const at = slot * SQE_BYTES;
    for (let i = 0; i < SQE_BYTES; i += 4) s.setUint32(at + i, 0);
    const id = this.nextId;
    this.nextId = id >= 0x7fffffff ? 1 : id + 1;
    s.setUint8(at, op);
    s.setInt32(at + 4, fd, true);
    s.setUint32(at + 8, offset >>> 0, true);
    s.setUint32(at + 12, Math.floor(offset / 2 ** 32), true);
    s.setUint32(at + 16, a >>> 0, true);
    s.setUint32(at + 20, Math.floor(a / 2 ** 32), true);
    s.setUint32(at + 24, len, true);
    s.setUint32(at + 28, flags, true);
    s.setUint32(at + 32, id, true);
    this.sqArray[slot] = slot;
    Atomics.store(this.sqTail, 0, (tail + 1) >>> 0);
    const done = new Promise<number>((resolve) => this.pending.set(id, { resolve, hold }));
    if (this.queued++ === 0 && this.deferred) {
      // Whoever queued it flushes at the end of its pass; this catches what a promise
      // continuation queues while its thread awaits something else (a reset waiting for
      // this very transfer, say), which no pass would flush.
      queueMicrotask(() => this.flush());
    }
    if (this.deferred) return done;
    this.flush();
    // Refused: the caller makes the call another way at once.
    return this.pending.has(id) ? done : undefined;
  }

  /**
   * Hands every queued operation to the kernel in one io_uring_enter (more only where the
   * kernel stopped early: it ends a batch at an entry that fails as it is submitted, which
   * still completes with its error). Where an enter takes nothing (EAGAIN under memory
   * pressure, say), the rest are taken back and resolve with RING_REFUSED, and the ring
   * takes no more; what it took still completes. Returns whether any was refused (its
   * caller then makes those calls another way, in promise continuations).
   */
  flush(): boolean {
    if (this.queued === 0) return false;
    this.queued = 0;
    const tail = Atomics.load(this.sqTail, 0);
    let head = Atomics.load(this.sqHead, 0);
    while (head !== tail) {
      this.enters++;
      const n = (tail - head) >>> 0;
      const r = this.enter(BigInt(n), 0n, 0n);
      if (r < 0 && errno() === EINTR) this.enter(BigInt(n), 0n, 0n);
      const now = Atomics.load(this.sqHead, 0);
      if (now === head) break; // no progress: refused
      head = now;
    }
    if (head === tail) return false;
    Atomics.store(this.sqTail, 0, head);
    this.closed = true;
    for (let i = head; i !== tail; i = (i + 1) >>> 0) {
      const id = this.sqes.getUint32((i & this.sqMask) * SQE_BYTES + 32, true);
      const p = this.pending.get(id);
      this.pending.delete(id);
      p?.resolve(RING_REFUSED);
    }
    return true;
  }

  private enter(submit: bigint, wait: bigint, flags: bigint): number {
    return Number(calls().enter(SYS_IO_URING_ENTER, this.fdArg, submit, wait, flags, null, 0n));
  }

  /**
   * Takes every completion posted so far and settles its operation (the continuations run
   * as promise jobs after the caller returns). Returns how many.
   */
  reap(): number {
    if (this.maps.length === 0) return 0; // closed: the rings are unmapped
    let head = Atomics.load(this.cqHead, 0);
    const tail = Atomics.load(this.cqTail, 0);
    let n = 0;
    while (head !== tail) {
      const at = this.cqesAt + (head & this.cqMask) * CQE_BYTES;
      const id = this.cqes.getUint32(at, true);
      const res = this.cqes.getInt32(at + 8, true);
      head = (head + 1) >>> 0;
      Atomics.store(this.cqHead, 0, head);
      const p = this.pending.get(id);
      if (!p) continue;
      this.pending.delete(id);
      this.completed++;
      n++;
      p.resolve(res);
    }
    return n;
  }

  /**
   * Waits (blocking this thread) until nothing is in flight, settling each completion: for
   * teardown, when no loop watches the eventfd any more. Disk operations end on their own;
   * this never waits for a guest.
   */
  drain(): void {
    this.flush();
    while (this.pending.size > 0) {
      if (this.reap() > 0) continue;
      this.enter(0n, 1n, IORING_ENTER_GETEVENTS);
    }
  }

  /** Waits for what is in flight, then unmaps the rings and closes the fds (once). */
  close(): void {
    if (this.maps.length === 0) return;
    this.closed = true;
    this.drain();
    for (const m of this.maps.splice(0)) sysMunmap(m.ptr, m.size);
    if (this.eventFd >= 0) sysClose(this.eventFd);
    sysClose(this.fd);
  }
}
