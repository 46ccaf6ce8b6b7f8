/**
 * A raw disk image as a BlockBackend: preadv/pwritev straight between the file and
 * guest RAM (no copies), fdatasync for FLUSH, fallocate punch-hole / zero-range for
 * DISCARD / WRITE_ZEROES. A transfer that needs no wait is made at once on the calling
 * thread (`transferNow`); the others go to the thread's io_uring where one is attached
 * (`attach`, the device thread does it), else to Deno's blocking pool, so disk I/O never
 * stalls the vCPUs or the device thread. The image is locked (flock) while open.
 */

import type { BlockBackend } from "../devices/virtio/blk_backend.ts";
import { errno, libc, pinnedCall, sysClose, SysError, sysOpen, sysRetireFd } from "./sys/libc.ts";
import { IOV_MAX, Iovecs } from "./sys/iovec.ts";
import { RING_REFUSED, Uring } from "./sys/uring.ts";
import type { EventLoop } from "./event_loop.ts";

const O_RDONLY = 0;
const O_RDWR = 2;
const O_CLOEXEC = 0o2000000;
const LOCK_SH = 1;
const LOCK_EX = 2;
const LOCK_NB = 4;
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;
const RWF_NOWAIT = 0x08;
/** An open image as FileBackend.share() hands it to another thread. */
export interface SharedDisk {
  /** The fd (owned by the sharing backend). */
  fd: number;
  /** Size in bytes. */
  size: number;
  /** Absolute path (serials derive from it). */
  identity: string;
  /** Opened read-only. */
  readonly: boolean;
  /** Whether RWF_NOWAIT is still tried, per direction. */
  nowait: { read: boolean; write: boolean };
  /** On tmpfs or ramfs. */
  memoryFs: boolean;
}

/** File systems whose files live in memory: a transfer never waits for a device. */
const MEMORY_FS = new Set([0x01021994, /* tmpfs */ 0x858458f6 /* ramfs */]);
/** Largest transfer made on the device thread itself (a bigger copy goes to the pool). */
const SYNC_MAX_BYTES = 1 << 20;
const EAGAIN = 11;
/**
 * Operations one disk's io_uring keeps in flight: as many as a virtio-blk queue holds requests
 * (each request is one operation), so the ring is never full while the guest waits on it (an
 * operation beyond would go to the pool).
 */
const RING_ENTRIES = 256;

/** An image that cannot be used; the message is one line for the user. */
export class DiskError extends Error {
  /** Builds the error. */
  constructor(message: string) {
    super(message);
    this.name = "DiskError";
  }
}

/** A raw image file opened for a VM. */
export class FileBackend implements BlockBackend {
  /** Size in bytes. */
  readonly size: number;
  /** Identity for derived serials: the absolute path. */
  readonly identity: string;
  private closing: Promise<void> | undefined;
  /** Whether the kernel takes RWF_NOWAIT on this file, per direction (until it says otherwise). */
  private nowait = { read: true, write: true };
  /** The image is on tmpfs or ramfs: reads, writes and syncs never wait for a device. */
  private memoryFs = false;
  private inFlight = 0;
  private idle: (() => void) | undefined;
  /** Whether close() closes the fd (false for a view another thread's backend owns). */
  private ownsFd = true;
  /** The io_uring transfers and syncs go to (`attach`), and its watch in the loop. */
  private ring: Uring | undefined;
  private unwatchRing: (() => void) | undefined;
  /** Takes the ring's flush out of the loop. */
  private unflushRing: (() => void) | undefined;
  /** Why there is no ring, for the report ("not attached" until `attach`). */
  private ringState = "not attached";

  private constructor(
    private readonly fd: number,
    size: number,
    identity: string,
    readonly readonly: boolean,
  ) {
    this.size = size;
    this.identity = identity;
  }

  /**
   * Opens and locks `path`; throws DiskError with a clear message. `opts.nowait: false`, or
   * `TSVMM_DISK_AT_ONCE=0` in the environment, makes no transfer at once: each goes to the
   * io_uring or the blocking pool (tests of those paths use it, and comparisons).
   */
  static open(path: string, readonly: boolean, opts: { nowait?: boolean } = {}): FileBackend {
    let abs: string;
    let st: Deno.FileInfo;
    try {
      abs = Deno.realPathSync(path);
      st = Deno.statSync(abs);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) throw new DiskError(`Cannot open disk "${path}": no such file`);
      throw new DiskError(`Cannot open disk "${path}": ${(e as Error).message}`);
    }
    if (!st.isFile && !st.isBlockDevice) {
      throw new DiskError(`Cannot open disk "${path}": not a file or block device`);
    }
    let fd: number;
    try {
      fd = sysOpen(abs, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    } catch (e) {
      const code = (e as SysError).errno;
      const why = code === 13 || code === 1
        ? "permission denied"
        : code === 30
        ? "read-only file system (use readonly)"
        : (e as Error).message;
      throw new DiskError(`Cannot open disk "${path}": ${why}`);
    }
    const how = (readonly ? LOCK_SH : LOCK_EX) | LOCK_NB;
    let held = libc().flock(fd, how) === 0;
    let e = held ? 0 : errno();
    // A flock that fails on a file just opened is nearly always another holder's lock; an
    // errno that says otherwise is asked once more, so a value some other code left in errno
    // between the call and the read is not reported as the reason.
    if (!held && e !== EAGAIN) {
      held = libc().flock(fd, how) === 0;
      if (!held) e = errno();
    }
    if (!held) {
      sysClose(fd);
      if (e === EAGAIN) throw new DiskError(`Cannot open disk "${path}": it is locked by another process`);
      throw new SysError(`flock ${path}`, e);
    }
    const size = st.isFile ? st.size : FileBackend.blockDeviceSize(abs);
    if (size < 512) {
      sysClose(fd);
      throw new DiskError(`Cannot use disk "${path}": it is smaller than one 512-byte sector`);
    }
    const b = new FileBackend(fd, size, abs, readonly);
    if (opts.nowait === false || Deno.env.get("TSVMM_DISK_AT_ONCE") === "0") {
      b.nowait = { read: false, write: false };
    } else if (st.isFile) {
      const sfs = new BigInt64Array(16); // struct statfs: f_type first
      if (libc().fstatfs(fd, new Uint8Array(sfs.buffer)) === 0) b.memoryFs = MEMORY_FS.has(Number(sfs[0]));
    }
    return b;
  }

  private static blockDeviceSize(path: string): number {
    const f = Deno.openSync(path);
    try {
      return f.seekSync(0, Deno.SeekMode.End);
    } finally {
      f.close();
    }
  }

  /**
   * Runs one host call on the image. Calls are counted so that `close()` waits for them:
   * the fd is closed only after the last one settled, so a queued call can never run on
   * an fd number the process has since reused for another file.
   */
  private async op<T>(call: () => Promise<T>): Promise<T> {
    if (this.closing) throw new Error("disk image is closed");
    this.inFlight++;
    try {
      return await call();
    } finally {
      if (--this.inFlight === 0) this.idle?.();
    }
  }

  private async vectored(write: boolean, bufs: Uint8Array[], offset: number): Promise<void> {
    let rest = bufs.filter((b) => b.length > 0);
    let off = offset;
    while (rest.length > 0) {
      const batch = rest.length > IOV_MAX ? rest.slice(0, IOV_MAX) : rest;
      const count = this.sync.fill(batch);
      const total = this.sync.bytes;
      // First on this thread with RWF_NOWAIT: data in the page cache (or room in it) moves at
      // once, with no trip through the blocking pool; what would wait goes to the pool. Not
      // where a ring takes it: the ring tries the same without waiting before it hands the
      // transfer to a kernel worker, and a virtio-blk request has just been tried at once
      // (`transferNow`), so a second try here would be a system call spent for nothing.
      const tryFirst = total <= SYNC_MAX_BYTES && (this.memoryFs || !this.ring?.hasRoom);
      let n = tryFirst ? this.tryNowait(write, this.sync.ptr, count, off) : -1;
      if (n < 0) {
        // An array of its own: the call may still run while another request fills `sync`.
        const iov = new Iovecs(count);
        iov.fill(batch);
        n = await this.onRing(this.ring?.vectored(write, this.fd, iov, count, off, batch), () => {
          this.poolCalls++;
          // The iovec array and the buffers stay referenced until the pool's call settles.
          return pinnedCall(
            [iov.words, ...batch],
            () =>
              write
                ? libc().pwritev_nb(this.fd, iov.ptr, count, BigInt(off))
                : libc().preadv_nb(this.fd, iov.ptr, count, BigInt(off)),
          );
        });
      }
      let done = n;
      if (n <= 0) {
        if (n < 0 || write) throw new Error(write ? "pwritev failed" : "preadv failed");
        // Past the end of a file that shrank: what is not there reads as zeros.
        for (const b of batch) b.fill(0);
        done = total;
      }
      off += done;
      // Drop what was transferred; a short transfer continues inside a buffer.
      let skip = done;
      const next: Uint8Array[] = [];
      for (const b of rest) {
        if (skip >= b.length) {
          skip -= b.length;
          continue;
        }
        next.push(skip ? b.subarray(skip) : b);
        skip = 0;
      }
      rest = next;
    }
  }

  /**
   * A synchronous transfer that cannot wait for a device: plain on a memory file system,
   * else with RWF_NOWAIT. Bytes moved, or -1 when it must go to the pool.
   */
  private tryNowait(write: boolean, p: Deno.PointerValue, count: number, off: number): number {
    const dir = write ? "write" : "read";
    if (!this.nowait[dir]) return -1;
    if (this.memoryFs) {
      const n = Number(
        write
          ? libc().pwritev(this.fd, p, count, BigInt(off))
          : libc().preadv(this.fd, p, count, BigInt(off)),
      );
      if (n > 0) this.nowaitHits++;
      return n > 0 ? n : -1;
    }
    const n = Number(
      write
        ? libc().pwritev2(this.fd, p, count, BigInt(off), RWF_NOWAIT)
        : libc().preadv2(this.fd, p, count, BigInt(off), RWF_NOWAIT),
    );
    if (n > 0) {
      this.nowaitHits++;
      return n;
    }
    // EAGAIN: not cached now. Anything else (EOPNOTSUPP on a file system without it): stop trying.
    if (n < 0 && errno() !== EAGAIN) this.nowait[dir] = false;
    return -1;
  }

  /** The iovec array of the transfers made at once (used and done within one call). */
  private readonly sync = new Iovecs();

  /** Transfers done at once with RWF_NOWAIT (for tests and the bench). */
  nowaitHits = 0;
  /** Transfers that went to the blocking pool. */
  poolCalls = 0;
  /** Transfers and syncs handed to the io_uring. */
  ringCalls = 0;
  /** io_uring_enter calls of a ring since detached. */
  private detachedEnters = 0;

  /** How transfers were made, for reports. */
  describe(): string {
    return `at_once=${this.nowaitHits} uring=${this.ringCalls} pool=${this.poolCalls} memory_fs=${this.memoryFs} nowait_read=${this.nowait.read} nowait_write=${this.nowait.write} io_uring=${
      this.ring?.isClosed ? "off(submission_refused)" : this.ringState
    } uring_enters=${this.ring?.enters ?? this.detachedEnters}`;
  }

  /**
   * Sends the transfers and syncs that cannot be made at once to an io_uring of this disk
   * whose completions `loop` (the thread's own, which must keep running while any is in
   * flight) takes, instead of Deno's blocking pool. Where the kernel refuses a ring, or
   * `TSVMM_IO_URING=0`, the pool stays; `describe()` says which and why.
   */
  attach(loop: EventLoop): void {
    if (this.ring || this.closing) return;
    if (Deno.env.get("TSVMM_IO_URING") === "0") {
      this.ringState = "off";
      return;
    }
    const why: { reason?: string } = {};
    const ring = Uring.open(RING_ENTRIES, why);
    if (!ring) {
      this.ringState = `refused(${why.reason?.replaceAll(" ", "_")})`;
      return;
    }
    // Edge-triggered: every completion the kernel posts after the last wake wakes the loop
    // again, and reap() takes all that are there, so the eventfd's counter is never read.
    // Watched before it is used: a ring nobody reaps would hold its transfers forever.
    try {
      this.unwatchRing = loop.add(ring.eventFd, () => ring.reap(), { edge: true });
      // The transfers one pass of the loop starts go to the kernel together, after the pass.
      ring.deferred = true;
      this.unflushRing = loop.addFlush(() => ring.flush());
    } catch (e) {
      ring.close();
      this.ringState = `refused(${(e as Error).message.replaceAll(" ", "_")})`;
      return;
    }
    this.ring = ring;
    this.ringState = "on";
  }

  /**
   * Takes the ring out of the loop and closes it, first waiting (blocking) for what is in
   * flight, then goes back to the pool. For teardown, after the devices were reset.
   */
  detach(): void {
    const ring = this.ring;
    if (!ring) return;
    this.ring = undefined;
    this.unwatchRing?.();
    this.unwatchRing = undefined;
    this.unflushRing?.();
    this.unflushRing = undefined;
    ring.close();
    this.detachedEnters = ring.enters;
    if (this.ringState === "on") this.ringState = "detached";
  }

  /**
   * The whole transfer at once on this thread, if it needs no wait (one system call with
   * RWF_NOWAIT, or plain on a memory file system): true when every byte moved. A request done
   * this way completes within the doorbell's dispatch, with no promise to settle.
   */
  transferNow(write: boolean, bufs: Uint8Array[], offset: number): boolean {
    if (this.closing || (write && this.readonly) || bufs.length > IOV_MAX) return false;
    const count = this.sync.fill(bufs);
    const total = this.sync.bytes;
    if (total === 0 || total > SYNC_MAX_BYTES) return false;
    return this.tryNowait(write, this.sync.ptr, count, offset) === total;
  }

  /** Reads into guest buffers. */
  read(bufs: Uint8Array[], offset: number): Promise<void> {
    return this.op(() => this.vectored(false, bufs, offset));
  }

  /** Writes guest buffers. */
  write(bufs: Uint8Array[], offset: number): Promise<void> {
    if (this.readonly) return Promise.reject(new Error("read-only disk"));
    return this.op(() => this.vectored(true, bufs, offset));
  }

  /** fdatasync. */
  async flush(): Promise<void> {
    if (this.readonly) return;
    this.syncs++;
    if (this.memoryFs && this.nowait.write) {
      // Nothing to wait for on a memory file system: no trip through the pool.
      if (libc().fdatasync(this.fd) < 0) throw new Error("fdatasync failed");
      return;
    }
    // Every call on the pool goes through pinnedCall, even with no buffer: pinnedCalls() is
    // how the device thread knows it must not block while one is in flight.
    const r = await this.op(() =>
      this.onRing(this.ring?.datasync(this.fd), () => pinnedCall([], () => libc().fdatasync_nb(this.fd)))
    );
    if (r < 0) throw new Error("fdatasync failed");
  }

  /** fdatasync calls made so far. */
  syncs = 0;

  /** Punches a hole (reads back zeros; the file keeps its size). */
  async discard(offset: number, len: number): Promise<void> {
    const r = await this.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
    if (r < 0) throw new Error("fallocate(PUNCH_HOLE) failed");
  }

  /** fallocate on the ring, else on the pool: 0 or negative. */
  private fallocate(mode: number, offset: number, len: number): Promise<number> {
    return this.op(() =>
      this.onRing(
        this.ring?.fallocate(this.fd, mode, offset, len),
        () => pinnedCall([], () => libc().fallocate_nb(this.fd, mode, BigInt(offset), BigInt(len))),
      )
    );
  }

  /** The ring's result, or the pool's where the ring did not take the call. */
  private async onRing(
    viaRing: Promise<number> | undefined,
    pool: () => Promise<number | bigint>,
  ): Promise<number> {
    const r = viaRing ? await viaRing : RING_REFUSED;
    if (r === RING_REFUSED) return Number(await pool());
    this.ringCalls++;
    return r;
  }

  /** Zeroes a range: punch-hole when unmapping is allowed, else zero-range; plain writes if neither works. */
  async writeZeroes(offset: number, len: number, unmap: boolean): Promise<void> {
    const mode = unmap
      ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
      : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    if ((await this.fallocate(mode, offset, len)) >= 0) return;
    const chunk = new Uint8Array(Math.min(len, 1 << 20));
    for (let at = 0; at < len; at += chunk.length) {
      await this.write([chunk.subarray(0, Math.min(chunk.length, len - at))], offset + at);
    }
  }

  /** What another thread needs to serve the same open image (`FileBackend.adopt`). */
  share(): SharedDisk {
    return {
      fd: this.fd,
      size: this.size,
      identity: this.identity,
      readonly: this.readonly,
      nowait: { ...this.nowait },
      memoryFs: this.memoryFs,
    };
  }

  /**
   * A backend over an image this process already opened and locked (`share()`, from another
   * thread). Its close() waits for its own calls but leaves the fd to the owner.
   */
  static adopt(d: SharedDisk): FileBackend {
    const b = new FileBackend(d.fd, d.size, d.identity, d.readonly);
    b.nowait = { ...d.nowait };
    b.memoryFs = d.memoryFs;
    b.ownsFd = false;
    return b;
  }

  /** Host calls on the image not yet settled. */
  get pending(): number {
    return this.inFlight;
  }

  /**
   * Refuses new calls, waits for the ones in flight, then closes (and so unlocks) the
   * image. Resolves once the fd is closed. With `retire`, for when another thread's calls on
   * this fd number may still be in flight (a device thread that died), the number is made
   * to name /dev/null rather than closed (`sysRetireFd`; left open if even that fails), so
   * none of those calls can reach a file opened later under the same number.
   */
  close(retire = false): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      const finish = () => {
        this.detach();
        if (this.ownsFd) retire ? sysRetireFd(this.fd) : sysClose(this.fd);
        resolve();
      };
      if (this.inFlight === 0) finish();
      else this.idle = finish;
    });
    return this.closing;
  }
}
