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
 * (it never writes). virtio-net is not rehearsed (its backend is the TAP).
 */

import type { DeviceSpec, QueueState } from "./device_thread.ts";
import { GuestMemory } from "./memory.ts";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../devices/virtio/chain.ts";
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC } from "../devices/virtio/queue.ts";
import { BLK_S, BLK_T } from "../devices/virtio/blk_request.ts";

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

/** Queue size of the scratch ring. */
const QSIZE = 16;
/**
 * Where the scratch memory sits in the twin's address space: above 4 GiB, so the address
 * arithmetic V8 sees during the rehearsal is on heap numbers as well as small integers and
 * the compiled code serves any guest address without being thrown away.
 */
export const SCRATCH_GPA = 0x1_0000_0000;
const DESC = 0x0;
const AVAIL = 0x400;
const USED = 0x800;
const TABLE = 0x1000; // an indirect table
const HEADER = 0x1100;
const STATUS = 0x1200;
const DATA = 0x2000;
const DATA_MAX = 4096;
/** Bytes of scratch memory one rehearsal uses. */
export const SCRATCH_BYTES = DATA + DATA_MAX;

/**
 * The spec of the twin a device of `spec` is rehearsed with, or undefined if that kind is
 * not rehearsed: an rng without a rate limit (the rehearsal must not wait on timers), a
 * blk over the same image read-only.
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
      return undefined;
  }
}

/**
 * A driver of one split queue in scratch memory, one request at a time: an rng request is
 * one 64-byte device-writable buffer; a blk request a read of the image's first sectors
 * (up to 4 KiB) through an indirect table of three descriptors, as Linux's virtio-blk
 * sends them.
 */
export class RehearsalDriver {
  /** The twin's guest memory: the scratch buffer at SCRATCH_GPA. */
  readonly memory: GuestMemory;
  private readonly bytes: Uint8Array;
  private readonly dv: DataView;
  private posted = 0;
  private taken = 0;
  private readonly dataLen: number;

  /**
   * A driver for a twin of `spec` (from rehearsalSpec) over `scratch` (SCRATCH_BYTES) that
   * negotiated `features` (indirect descriptors and event index as offered).
   */
  constructor(readonly spec: DeviceSpec, scratch: Uint8Array, private readonly features: bigint) {
    if (scratch.length < SCRATCH_BYTES) throw new RangeError("scratch memory too small");
    this.bytes = scratch;
    this.dv = new DataView(scratch.buffer, scratch.byteOffset, scratch.length);
    this.memory = new GuestMemory([{ gpa: SCRATCH_GPA, bytes: scratch }]);
    this.dataLen = spec.kind === "blk" ? Math.min(DATA_MAX, Math.floor(spec.disk.size / 512) * 512) : 64;
  }

  private has(bit: bigint): boolean {
    return (this.features & (1n << bit)) !== 0n;
  }

  /** The queue as the transport would hand it over at DRIVER_OK. */
  queue(maxSize: number): QueueState {
    return {
      maxSize,
      size: Math.min(QSIZE, maxSize),
      ready: true,
      descAddr: SCRATCH_GPA + DESC,
      availAddr: SCRATCH_GPA + AVAIL,
      usedAddr: SCRATCH_GPA + USED,
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

  /** Puts the next request in the available ring (the caller rings the doorbell). */
  post(): void {
    const size = Math.min(QSIZE, this.queueMax);
    const dv = this.dv;
    if (this.spec.kind === "blk") {
      dv.setUint32(HEADER, BLK_T.IN, true);
      dv.setUint32(HEADER + 4, 0, true);
      dv.setBigUint64(HEADER + 8, 0n, true);
      this.bytes[STATUS] = 0xff;
      const parts: Array<[number, number, number]> = [
        [HEADER, 16, 0],
        [DATA, this.dataLen, VIRTQ_DESC_F_WRITE],
        [STATUS, 1, VIRTQ_DESC_F_WRITE],
      ];
      if (this.has(VIRTIO_F_INDIRECT_DESC)) {
        parts.forEach(([a, l, f], i) =>
          this.desc(TABLE + 16 * i, a, l, f | (i < 2 ? VIRTQ_DESC_F_NEXT : 0), i + 1)
        );
        this.desc(DESC, TABLE, 16 * parts.length, VIRTQ_DESC_F_INDIRECT, 0);
      } else {
        parts.forEach(([a, l, f], i) =>
          this.desc(DESC + 16 * i, a, l, f | (i < 2 ? VIRTQ_DESC_F_NEXT : 0), i + 1)
        );
      }
    } else {
      this.desc(DESC, DATA, this.dataLen, VIRTQ_DESC_F_WRITE, 0);
    }
    dv.setUint16(AVAIL + 4 + 2 * (this.posted % size), 0, true); // head 0: one request at a time
    // Event index: interrupt as soon as this request is used.
    dv.setUint16(AVAIL + 4 + 2 * size, this.posted & 0xffff, true);
    dv.setUint16(AVAIL, 0, true); // flags: interrupts wanted
    this.posted++;
    dv.setUint16(AVAIL + 2, this.posted & 0xffff, true);
  }

  /** The largest queue size the twin offers (set before the first post). */
  queueMax = QSIZE;

  /**
   * Takes what the twin has used since the last call; returns how many requests finished,
   * or -1 if one came back wrong (a blk status other than OK, a short rng answer).
   */
  takeUsed(): number {
    const size = Math.min(QSIZE, this.queueMax);
    const idx = this.dv.getUint16(USED + 2, true);
    let n = 0;
    while ((this.taken & 0xffff) !== idx) {
      const len = this.dv.getUint32(USED + 4 + 8 * (this.taken % size) + 4, true);
      this.taken++;
      n++;
      if (this.spec.kind === "blk" ? this.bytes[STATUS] !== BLK_S.OK : len !== this.dataLen) return -1;
    }
    return n;
  }

  /** Requests posted and not yet taken back. */
  get inFlight(): number {
    return this.posted - this.taken;
  }
}
