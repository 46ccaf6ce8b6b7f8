/**
 * The device thread's warm-up ("rehearsal"). A device thread is a fresh V8 isolate: its
 * code starts in the interpreter and is compiled by V8's optimizing tiers only after it
 * has run some hundreds to thousands of times, and on this machine kind a virtio-rng
 * request cost the device thread about 70 us of CPU over the first 64 requests, 40 us up
 * to 256 and 22 us up to 1,024, against 10 us once warm (docs/PERFORMANCE.md). A guest's
 * first requests (its boot, a 16 KiB read of /dev/hwrng) would all pay that.
 *
 * So when a device of a kind is added, the device thread first serves a twin of it (same
 * class, same doorbell handler, queue, interrupt and event-loop code) over memory and
 * eventfds of its own: this module's driver posts one request at a time into a scratch
 * ring, rings the twin's doorbell and takes the answer when the twin's interrupt eventfd
 * fires, until the set number of requests has been served, its time budget has passed
 * (REHEARSAL_IDLE_BUDGET_MS at nice 19, else REHEARSAL_BUDGET_MS) or the guest's first
 * doorbell rings, whichever comes first. Nothing of the guest's is
 * touched: the scratch memory is a private ArrayBuffer, the eventfds are private, and a
 * virtio-blk twin reads the first sectors of the same image through a read-only backend
 * (it never writes). A virtio-net twin's backend is a loopback in memory (LoopbackNet): each
 * frame the driver queues for transmit comes back on the twin's receive queue, so both
 * queues' code runs and nothing reaches the guest's TAP.
 */

import type { DeviceSpec, QueueState } from "./device_thread.ts";
import { GuestMemory } from "./memory.ts";
import {
  scatter,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../devices/virtio/chain.ts";
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC } from "../devices/virtio/queue.ts";
import { BLK_S, BLK_T } from "../devices/virtio/blk_request.ts";
import { MAX_GSO_FRAME, type NetBackend } from "../devices/virtio/net.ts";

/**
 * Requests each device kind is rehearsed with: TSVMM_REHEARSE as this process has it now (a
 * non-negative integer; 0 turns the rehearsal off), else 2,000.
 */
export function rehearsalRequests(): number {
  const n = Number(Deno.env.get("TSVMM_REHEARSE") ?? "2000");
  return Number.isSafeInteger(n) && n >= 0 ? n : 2000;
}

/**
 * The longest a rehearsal may run at the thread's own priority, in milliseconds, whatever it
 * has served by then. On a host KVM 2,000 requests take tens of milliseconds; where the host
 * is slow (the nested runner's L1 under TCG took 1.3-6 s) the warm-up would otherwise take a
 * CPU from the guest's boot for seconds, so it stops here with what it has done.
 */
export const REHEARSAL_BUDGET_MS = 250;

/**
 * The longest a rehearsal may run at nice 19 (where the thread may come back from it), in
 * milliseconds. At that priority it only takes CPU time nothing else wants, and a guest's
 * first doorbell ends it anyway; in the nested L1 250 ms covered 60-150 of the 2,000
 * requests, which left the guest's first rng requests on code V8 had not optimized yet
 * (docs/PERFORMANCE.md, 2026-12-04).
 */
export const REHEARSAL_IDLE_BUDGET_MS = 5000;

/** Queue size of the scratch rings. */
const QSIZE = 16;
/**
 * Where the scratch memory sits in the twin's address space: above 4 GiB, so the address
 * arithmetic V8 sees during the rehearsal is on heap numbers as well as small integers and
 * the compiled code serves any guest address without being thrown away.
 */
export const SCRATCH_GPA = 0x1_0000_0000;
/** Queue 0's ring (rng, blk, net's receive queue). */
const RING0 = { desc: 0x0, avail: 0x400, used: 0x800 };
const TABLE = 0x1000; // an indirect table
const HEADER = 0x1100;
const STATUS = 0x1200;
const DATA = 0x2000;
const DATA_MAX = 4096;
/** Queue 1's ring (net's transmit queue). */
const RING1 = { desc: 0x3000, avail: 0x3400, used: 0x3800 };
/**
 * net's receive buffers, one per descriptor of queue 0: with every offload a frame may need
 * 64 KiB of them, and the twin reads only when that much is posted (as a guest posts it), so
 * one used buffer still leaves enough.
 */
const RX_BUFS = 0x4000;
const RX_BUF = 0x2000;
/** The net header (with num_buffers: mergeable buffers or VERSION_1) and an Ethernet frame. */
const NET_HDR = 12;
const FRAME = 98;
/** Bytes of scratch memory one rehearsal uses. */
export const SCRATCH_BYTES = RX_BUFS + QSIZE * RX_BUF;

/**
 * The spec of the twin a device of `spec` is rehearsed with, or undefined if that kind is
 * not rehearsed: an rng without a rate limit (the rehearsal must not wait on timers), a
 * blk over the same image read-only, a net over a loopback (`tapFd` -1).
 */
export function rehearsalSpec(spec: DeviceSpec): DeviceSpec | undefined {
  switch (spec.kind) {
    case "rng":
      // The same options object where it has no rate limit, so V8 sees one shape of it.
      return spec.opts.rateBytesPerSec
        ? { kind: "rng", opts: { maxRequestBytes: spec.opts.maxRequestBytes } }
        : { kind: "rng", opts: spec.opts };
    case "blk":
      return spec.disk.size >= 512 ? { kind: "blk", disk: { ...spec.disk, readonly: true } } : undefined;
    case "net":
      return { kind: "net", tapFd: -1, mac: spec.mac, mtu: spec.mtu };
  }
}

/** How many of a twin's queues its rehearsal drives (each with a doorbell of its own). */
export function rehearsedQueues(spec: DeviceSpec): number {
  return spec.kind === "net" ? 2 : 1;
}

/**
 * A net backend that hands each frame written to it back to the next read: a virtio-net
 * twin's TAP. It holds one frame; a write while one waits is refused with EAGAIN (and the
 * writer called back once it is read). It never calls the readable callback: the device
 * reads back after each transmit pass by itself (devices/virtio/net.ts), and a driver's
 * receive notify reads what is left.
 */
export class LoopbackNet implements NetBackend {
  private readonly frame = new Uint8Array(MAX_GSO_FRAME + NET_HDR);
  private len = -1;
  private writable: (() => void) | undefined;

  /** Copies the waiting frame into `bufs`; its length, or -11 (EAGAIN) if none waits. */
  readFrame(bufs: Uint8Array[]): number {
    if (this.len < 0) return -11;
    const n = this.len;
    scatter(bufs, 0, this.frame.subarray(0, n));
    this.len = -1;
    const w = this.writable;
    if (w) setTimeout(w, 0);
    return n;
  }

  /** Keeps the frame made of `bufs` for the next read; -11 (EAGAIN) while one waits. */
  writeFrame(bufs: Uint8Array[]): number {
    if (this.len >= 0) return -11;
    let n = 0;
    for (const b of bufs) {
      if (n + b.length > this.frame.length) return -22; // EINVAL: larger than any frame
      this.frame.set(b, n);
      n += b.length;
    }
    this.len = n;
    return n;
  }

  /** Nothing to tell: frames are handed back as they were written. */
  setHeaderSize(): void {}

  /** Nothing to tell: frames are handed back as they were written. */
  setOffloads(): void {}

  /** Not called back (see the class). */
  onReadable(): void {}

  /** Calls `fn` (once, later) when the waiting frame has been read. */
  onWritable(fn: (() => void) | undefined): void {
    this.writable = fn;
  }
}

/** One split ring in scratch memory, from its driver's side. */
class ScratchRing {
  posted = 0;
  taken = 0;
  /** The length of the used entry `next` returned last. */
  len = 0;
  constructor(
    private readonly dv: DataView,
    readonly at: { desc: number; avail: number; used: number },
    readonly size: number,
  ) {}

  /** Puts chain `head` in the available ring (the caller rings the doorbell). */
  offer(head: number): void {
    const { dv, size } = this;
    const avail = this.at.avail;
    dv.setUint16(avail + 4 + 2 * (this.posted % size), head, true);
    // Event index: interrupt as soon as the next entry is used.
    dv.setUint16(avail + 4 + 2 * size, this.taken & 0xffff, true);
    dv.setUint16(avail, 0, true); // flags: interrupts wanted
    this.posted++;
    dv.setUint16(avail + 2, this.posted & 0xffff, true);
  }

  /** The next used entry's head (its length in `len`), or -1 if there is none. */
  next(): number {
    const used = this.at.used;
    if ((this.taken & 0xffff) === this.dv.getUint16(used + 2, true)) return -1;
    const at = used + 4 + 8 * (this.taken % this.size);
    this.taken++;
    this.len = this.dv.getUint32(at + 4, true);
    return this.dv.getUint32(at, true);
  }
}

const RING_0: readonly number[] = [0];
const RINGS_0_1: readonly number[] = [0, 1];
const RING_1: readonly number[] = [1];

/**
 * The driver of a twin's queues in scratch memory, one request at a time: an rng request is
 * one 64-byte device-writable buffer; a blk request a read of the image's first sectors (up
 * to 4 KiB) through an indirect table of three descriptors, as Linux's virtio-blk sends
 * them; a net request one frame on the transmit queue (in one descriptor and in a table of
 * two, alternately), taken back from the receive queue, where 16 buffers stay posted.
 */
export class RehearsalDriver {
  /** The twin's guest memory: the scratch buffer at SCRATCH_GPA. */
  readonly memory: GuestMemory;
  private readonly bytes: Uint8Array;
  private readonly dv: DataView;
  private readonly rings: ScratchRing[];
  private readonly dataLen: number;
  /** net: frames taken back, and receive buffers used and not yet posted again. */
  private frames = 0;
  private readonly repost: number[] = [];

  /**
   * A driver for a twin of `spec` (from rehearsalSpec) over `scratch` (SCRATCH_BYTES) that
   * negotiated `features` (indirect descriptors and event index as offered), whose queues
   * are at most `queueMaxSizes` long.
   */
  constructor(
    readonly spec: DeviceSpec,
    scratch: Uint8Array,
    private readonly features: bigint,
    queueMaxSizes: readonly number[],
  ) {
    if (scratch.length < SCRATCH_BYTES) throw new RangeError("scratch memory too small");
    this.bytes = scratch;
    this.dv = new DataView(scratch.buffer, scratch.byteOffset, scratch.length);
    this.memory = new GuestMemory([{ gpa: SCRATCH_GPA, bytes: scratch }]);
    this.dataLen = spec.kind === "blk" ? Math.min(DATA_MAX, Math.floor(spec.disk.size / 512) * 512) : 64;
    this.rings = [RING0, RING1].slice(0, rehearsedQueues(spec)).map((at, i) =>
      new ScratchRing(this.dv, at, Math.min(QSIZE, queueMaxSizes[i]))
    );
    if (spec.kind === "net") {
      const rx = this.rings[0];
      for (let i = 0; i < rx.size; i++) {
        this.desc(RING0.desc + 16 * i, RX_BUFS + RX_BUF * i, RX_BUF, VIRTQ_DESC_F_WRITE, 0);
        this.repost.push(i);
      }
    }
  }

  private has(bit: bigint): boolean {
    return (this.features & (1n << bit)) !== 0n;
  }

  /** Queue `index` as the transport would hand it over at DRIVER_OK (not ready if unused). */
  queue(index: number, maxSize: number): QueueState {
    const ring = this.rings[index];
    const at = ring?.at ?? RING0;
    return {
      maxSize,
      size: Math.min(QSIZE, maxSize),
      ready: ring !== undefined,
      descAddr: SCRATCH_GPA + at.desc,
      availAddr: SCRATCH_GPA + at.avail,
      usedAddr: SCRATCH_GPA + at.used,
      nextAvail: 0,
      nextUsed: 0,
      indirect: this.has(VIRTIO_F_INDIRECT_DESC),
      eventIdx: this.has(VIRTIO_F_EVENT_IDX),
    };
  }

  private desc(at: number, addr: number, len: number, flags: number, next: number): void {
    const dv = this.dv;
    dv.setBigUint64(at, BigInt(SCRATCH_GPA + addr), true);
    dv.setUint32(at + 8, len, true);
    dv.setUint16(at + 12, flags, true);
    dv.setUint16(at + 14, next, true);
  }

  /** Descriptors `parts` as one chain at head 0 of `ring` (through a table if offered). */
  private chain(ring: ScratchRing, parts: Array<[number, number, number]>): void {
    const last = parts.length - 1;
    if (parts.length > 1 && this.has(VIRTIO_F_INDIRECT_DESC)) {
      parts.forEach(([a, l, f], i) =>
        this.desc(TABLE + 16 * i, a, l, f | (i < last ? VIRTQ_DESC_F_NEXT : 0), i + 1)
      );
      this.desc(ring.at.desc, TABLE, 16 * parts.length, VIRTQ_DESC_F_INDIRECT, 0);
    } else {
      parts.forEach(([a, l, f], i) =>
        this.desc(ring.at.desc + 16 * i, a, l, f | (i < last ? VIRTQ_DESC_F_NEXT : 0), i + 1)
      );
    }
    ring.offer(0);
  }

  /** The byte at `i` of frame number `k`: an Ethernet header, then a pattern of k. */
  private static frameByte(k: number, i: number): number {
    if (i < 12) return i < 6 ? 0xff : 0x02; // broadcast, from a local address
    if (i === 12) return 0x08; // IPv4
    if (i === 13) return 0x00;
    return (i * 7 + k) & 0xff;
  }

  /**
   * Puts the next request in the available ring(s); returns the queues whose doorbells the
   * caller rings, in order.
   */
  post(): readonly number[] {
    const dv = this.dv;
    const ring = this.rings[0];
    switch (this.spec.kind) {
      case "blk":
        dv.setUint32(HEADER, BLK_T.IN, true);
        dv.setUint32(HEADER + 4, 0, true);
        dv.setBigUint64(HEADER + 8, 0n, true);
        this.bytes[STATUS] = 0xff;
        this.chain(ring, [[HEADER, 16, 0], [DATA, this.dataLen, VIRTQ_DESC_F_WRITE], [
          STATUS,
          1,
          VIRTQ_DESC_F_WRITE,
        ]]);
        return RING_0;
      case "rng":
        this.chain(ring, [[DATA, this.dataLen, VIRTQ_DESC_F_WRITE]]);
        return RING_0;
      case "net": {
        const reposted = this.repost.length > 0;
        for (const head of this.repost) ring.offer(head);
        this.repost.length = 0;
        const tx = this.rings[1];
        const k = tx.posted;
        this.bytes.fill(0, DATA, DATA + NET_HDR); // no checksum or segmentation to do
        for (let i = 0; i < FRAME; i++) this.bytes[DATA + NET_HDR + i] = RehearsalDriver.frameByte(k, i);
        this.chain(
          tx,
          k & 1 ? [[DATA, NET_HDR, 0], [DATA + NET_HDR, FRAME, 0]] : [[DATA, NET_HDR + FRAME, 0]],
        );
        return reposted ? RINGS_0_1 : RING_1;
      }
    }
  }

  /**
   * Takes what the twin has used since the last call; returns how many requests finished,
   * or -1 if one came back wrong (a blk status other than OK, a short rng answer, a net
   * frame other than the one sent).
   */
  takeUsed(): number {
    const ring = this.rings[0];
    let n = 0;
    if (this.spec.kind !== "net") {
      while (ring.next() >= 0) {
        n++;
        if (this.spec.kind === "blk" ? this.bytes[STATUS] !== BLK_S.OK : ring.len !== this.dataLen) return -1;
      }
      return n;
    }
    while (this.rings[1].next() >= 0) if (this.rings[1].len !== 0) return -1;
    for (let head; (head = ring.next()) >= 0;) {
      if (head >= ring.size || ring.len !== NET_HDR + FRAME) return -1;
      const at = RX_BUFS + RX_BUF * head;
      if (this.dv.getUint16(at + 10, true) !== 1) return -1; // num_buffers
      for (let i = 0; i < FRAME; i++) {
        if (this.bytes[at + NET_HDR + i] !== RehearsalDriver.frameByte(this.frames, i)) return -1;
      }
      this.frames++;
      this.repost.push(head);
      n++;
    }
    return n;
  }

  /** Requests posted and not yet taken back. */
  get inFlight(): number {
    const first = this.rings[0];
    if (this.spec.kind !== "net") return first.posted - first.taken;
    const tx = this.rings[1];
    return tx.posted - Math.min(tx.taken, this.frames);
  }
}
