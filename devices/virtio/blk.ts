/**
 * virtio-blk (virtio 1.2 section 5.2): IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES
 * on an injected BlockBackend. Requests run concurrently; each completes into the used
 * ring when its I/O finishes. A reset stops the device at once (late completions are
 * dropped by a generation check) and reports itself done only when no request is still
 * reading or writing guest memory. Without VIRTIO_BLK_F_FLUSH negotiated every write is
 * made durable before it completes (write-through, section 5.2.6.2).
 */

import { type ActivateContext, drainQueue, readConfigBytes, VIRTIO_ID, type VirtioDevice } from "./device.ts";
import { type SplitQueue, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC } from "./queue.ts";
import { ChainError, scatter } from "./chain.ts";
import {
  BLK_ID_BYTES,
  BLK_S,
  BLK_T,
  type BlkRequest,
  parseBlkRequest,
  parseSegments,
  SECTOR,
} from "./blk_request.ts";
import type { BlockBackend } from "./blk_backend.ts";

/** Feature bits (virtio 1.2 section 5.2.3). */
export const BLK_F = {
  SIZE_MAX: 1n,
  SEG_MAX: 2n,
  RO: 5n,
  BLK_SIZE: 6n,
  FLUSH: 9n,
  DISCARD: 13n,
  WRITE_ZEROES: 14n,
} as const;

const QUEUE_SIZE = 256;
/** Largest data segment (descriptor) of a request: size_max. */
const SIZE_MAX = 1 << 20;
/** Most data segments in a request: seg_max (header and status take the other two descriptors). */
const SEG_MAX = QUEUE_SIZE - 2;
const MAX_DISCARD_SECTORS = 1 << 22; // per segment: 2 GiB
const CONFIG_SIZE = 60;

/** Options of a virtio-blk device. */
export interface BlkOptions {
  /** GET_ID serial (up to 20 bytes); derived from the backend's identity when absent. */
  serial?: string;
}

/** A serial derived from a string: "tsvmm-" and 14 hex digits of its FNV-1a hash; never all zero. */
export function derivedSerial(identity: string): string {
  let h = 0xcbf29ce484222325n;
  for (const b of new TextEncoder().encode(identity)) {
    h ^= BigInt(b);
    h = (h * 0x100000001b3n) & 0xffff_ffff_ffff_ffffn;
  }
  return "tsvmm-" + h.toString(16).padStart(16, "0").slice(0, 14);
}

/**
 * The used length of a finished request (virtio 1.2 section 2.7.8.2): the bytes written
 * from the start of the chain's device-writable part without a gap. Data written in full
 * (IN, or GET_ID filling its whole buffer) runs into the status byte and counts it; a
 * request that wrote no data counts the status byte only when nothing else is writable.
 */
export function usedLength(req: BlkRequest, status: number): number {
  const ok = status === BLK_S.OK;
  const dataWritten = !ok
    ? 0
    : req.type === BLK_T.IN
    ? req.dataLen
    : req.type === BLK_T.GET_ID
    ? Math.min(BLK_ID_BYTES, req.dataLen)
    : 0;
  // Bytes before the status byte in the writable part: the data for IN/GET_ID, else any
  // writable bytes the driver gave beyond the status byte.
  const before = req.writableLen - 1;
  return dataWritten === before ? before + 1 : dataWritten;
}

/** The virtio block device. */
export class VirtioBlk implements VirtioDevice {
  /** Device type. */
  readonly deviceType: number = VIRTIO_ID.BLOCK;
  /** Name. */
  readonly name = "virtio-blk";
  /** Offered features. */
  readonly features: bigint;
  /** One request queue. */
  readonly queueMaxSizes: readonly number[] = [QUEUE_SIZE];
  /** The GET_ID answer. */
  readonly serial: Uint8Array;
  private readonly config = new Uint8Array(CONFIG_SIZE);
  private ctx: ActivateContext | undefined;
  private generation = 0;
  private inFlight = 0;
  private drained: (() => void) | undefined;
  private writeThrough = false;
  /** Requests answered, by status, for diagnostics. */
  readonly answered: Record<number, number> = { 0: 0, 1: 0, 2: 0 };

  /** A block device over `backend`. */
  constructor(private readonly backend: BlockBackend, opts: BlkOptions = {}) {
    let f = (1n << VIRTIO_F_INDIRECT_DESC) | (1n << VIRTIO_F_EVENT_IDX) | (1n << BLK_F.SIZE_MAX) |
      (1n << BLK_F.SEG_MAX) | (1n << BLK_F.BLK_SIZE) | (1n << BLK_F.FLUSH);
    f |= backend.readonly ? 1n << BLK_F.RO : (1n << BLK_F.DISCARD) | (1n << BLK_F.WRITE_ZEROES);
    this.features = f;
    const serial = opts.serial ?? derivedSerial(backend.identity);
    const s = new TextEncoder().encode(serial).subarray(0, BLK_ID_BYTES);
    if (s.every((b) => b === 0)) throw new TypeError("a virtio-blk serial must not be empty or all zero");
    this.serial = new Uint8Array(BLK_ID_BYTES);
    this.serial.set(s);
    const dv = new DataView(this.config.buffer);
    dv.setBigUint64(0, BigInt(Math.floor(backend.size / SECTOR)), true); // capacity
    dv.setUint32(8, SIZE_MAX, true); // size_max
    dv.setUint32(12, SEG_MAX, true); // seg_max
    dv.setUint32(20, SECTOR, true); // blk_size
    dv.setUint16(34, 1, true); // num_queues
    dv.setUint32(36, MAX_DISCARD_SECTORS, true); // max_discard_sectors
    dv.setUint32(40, 1, true); // max_discard_seg
    dv.setUint32(44, 1, true); // discard_sector_alignment
    dv.setUint32(48, MAX_DISCARD_SECTORS, true); // max_write_zeroes_sectors
    dv.setUint32(52, 1, true); // max_write_zeroes_seg
    this.config[56] = 1; // write_zeroes_may_unmap
  }

  /** Capacity in 512-byte sectors. */
  get capacity(): number {
    return Math.floor(this.backend.size / SECTOR);
  }

  /** Reads virtio_blk_config. */
  readConfig(offset: number, data: Uint8Array): void {
    readConfigBytes(this.config, offset, data);
  }

  /** The config space is read-only here (no writeback toggle offered). */
  writeConfig(): void {}

  /** Starts serving. */
  activate(ctx: ActivateContext): void {
    this.ctx = ctx;
    this.writeThrough = (ctx.features & (1n << BLK_F.FLUSH)) === 0n;
    this.process();
  }

  /** The driver queued requests. */
  notify(_index: number): void {
    this.process();
  }

  /**
   * Drops the queue; completions of requests started before are discarded. While any of
   * them still runs (its disk I/O may be writing a guest buffer), returns a promise that
   * settles when the last one has finished.
   */
  reset(): void | Promise<void> {
    this.ctx = undefined;
    this.generation++;
    if (this.inFlight === 0) return;
    return new Promise<void>((resolve) => {
      const prev = this.drained;
      this.drained = () => {
        prev?.();
        resolve();
      };
    });
  }

  private process(): void {
    const ctx = this.ctx;
    if (!ctx) return;
    const q = ctx.queues[0];
    if (!q?.ready) return;
    const gen = this.generation;
    let doneNow = false;
    drainQueue(ctx, q, (chain) => {
      const req = parseBlkRequest(chain);
      if ("error" in req) {
        ctx.interrupt.needsReset(`virtio-blk: ${req.error}`);
        return false;
      }
      if (this.start(req, chain.head)) doneNow = true;
      // A request completed at once may have asked for a reset (its used entry outside RAM):
      // the rings are not ours any more.
      return gen === this.generation;
    });
    // One interrupt for the requests completed at once in this pass, as for a batch; none once
    // the device was reset meanwhile (a later chain in this pass was broken: NEEDS_RESET).
    if (doneNow && gen === this.generation) this.signalUsed(ctx, q);
  }

  /**
   * Starts a request; true when it is already complete (its used entry written, its
   * interrupt left to the caller): a read or write the backend moved at once.
   */
  private start(req: BlkRequest, head: number): boolean {
    const gen = this.generation;
    const t0 = performance.now();
    this.inFlight++;
    if (this.transferNow(req)) {
      this.complete(gen, req, head, BLK_S.OK, t0, false);
      return true;
    }
    this.execute(req, gen).then(
      (st) => this.complete(gen, req, head, st, t0),
      () => this.complete(gen, req, head, BLK_S.IOERR, t0),
    );
    return false;
  }

  /** Requests answered, their summed and largest time from taking the chain to the used entry, in ms. */
  private service = { count: 0, totalMs: 0, maxMs: 0 };

  /** Request counts and service times (chain taken -> used entry written), for reports and the bench. */
  describe(): string {
    const s = this.service;
    const avg = s.count ? (s.totalMs / s.count) * 1000 : 0;
    return `requests=${s.count} service_avg_us=${avg.toFixed(0)} service_max_us=${
      (s.maxMs * 1000).toFixed(0)
    }` +
      (this.backend.describe ? ` ${this.backend.describe()}` : "");
  }

  private inRange(sector: number, bytes: number): boolean {
    return Number.isSafeInteger(sector) && sector >= 0 && sector * SECTOR + bytes <= this.capacity * SECTOR;
  }

  /**
   * A valid IN, or OUT without write-through, moved by the backend at once (`transferNow`).
   * False leaves the request to `execute`, which also answers the invalid ones.
   */
  private transferNow(req: BlkRequest): boolean {
    const b = this.backend;
    const write = req.type === BLK_T.OUT;
    if (!b.transferNow || (!write && req.type !== BLK_T.IN) || (write && this.writeThrough)) return false;
    return this.validTransfer(req) && b.transferNow(write, req.data, req.sector * SECTOR);
  }

  /**
   * Whether an IN or OUT is whole sectors inside the disk and keeps to the seg_max and
   * size_max we advertise (else it is answered IOERR).
   */
  private validTransfer(req: BlkRequest): boolean {
    return req.dataLen % SECTOR === 0 && this.inRange(req.sector, req.dataLen) &&
      req.data.length <= SEG_MAX && req.data.every((d) => d.length <= SIZE_MAX);
  }

  /** Runs one request; resolves with its status. Steps after a reset are not started. */
  private async execute(req: BlkRequest, gen: number): Promise<number> {
    const b = this.backend;
    const live = () => gen === this.generation;
    switch (req.type) {
      case BLK_T.IN:
        if (!this.validTransfer(req)) return BLK_S.IOERR;
        await b.read(req.data, req.sector * SECTOR);
        return BLK_S.OK;
      case BLK_T.OUT:
        if (b.readonly || !this.validTransfer(req)) return BLK_S.IOERR;
        await b.write(req.data, req.sector * SECTOR);
        if (this.writeThrough && live()) await b.flush();
        return BLK_S.OK;
      case BLK_T.FLUSH:
      case BLK_T.FLUSH_OUT:
        await b.flush();
        return BLK_S.OK;
      case BLK_T.GET_ID:
        scatter(req.data, 0, this.serial.subarray(0, Math.min(BLK_ID_BYTES, req.dataLen)));
        return BLK_S.OK;
      case BLK_T.DISCARD:
      case BLK_T.WRITE_ZEROES: {
        if (b.readonly) return BLK_S.IOERR;
        const segs = parseSegments(req);
        if (!segs || segs.length > 1) return BLK_S.UNSUPP;
        for (const s of segs) {
          if (!live()) break;
          if (!this.inRange(s.sector, s.sectors * SECTOR)) return BLK_S.IOERR;
          if (s.sectors === 0) continue; // nothing to do, for both types alike
          if (req.type === BLK_T.DISCARD) {
            if (s.flags !== 0) return BLK_S.UNSUPP;
            await b.discard(s.sector * SECTOR, s.sectors * SECTOR);
          } else {
            if (s.flags & ~1) return BLK_S.UNSUPP;
            await b.writeZeroes(s.sector * SECTOR, s.sectors * SECTOR, (s.flags & 1) === 1);
          }
          if (this.writeThrough && live()) await b.flush();
        }
        return BLK_S.OK;
      }
      default:
        return BLK_S.UNSUPP;
    }
  }

  private complete(
    gen: number,
    req: BlkRequest,
    head: number,
    status: number,
    t0: number,
    interrupt = true,
  ): void {
    if (--this.inFlight === 0 && this.drained) {
      const done = this.drained;
      this.drained = undefined;
      done();
    }
    const ctx = this.ctx;
    if (gen !== this.generation || !ctx) return; // reset meanwhile: the rings are not ours any more
    const q = ctx.queues[0];
    if (!q.ready) return; // the driver took the queue out of service
    this.answered[status] = (this.answered[status] ?? 0) + 1;
    const ms = performance.now() - t0;
    this.service.count++;
    this.service.totalMs += ms;
    if (ms > this.service.maxMs) this.service.maxMs = ms;
    req.status[0] = status;
    try {
      q.pushUsed(ctx.memory, head, usedLength(req, status));
    } catch (e) {
      if (e instanceof ChainError) return ctx.interrupt.needsReset(e.message);
      throw e;
    }
    if (interrupt) this.signalUsed(ctx, q);
  }

  /** Interrupts the driver if it wants to hear of the used entries written so far. */
  private signalUsed(ctx: ActivateContext, q: SplitQueue): void {
    try {
      if (q.needsInterrupt(ctx.memory)) ctx.interrupt.signalUsed(0);
    } catch (e) {
      if (e instanceof ChainError) ctx.interrupt.needsReset(e.message);
      else throw e;
    }
  }

  /** Requests still running. */
  get pending(): number {
    return this.inFlight;
  }
}
