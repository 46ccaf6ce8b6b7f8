/**
 * virtio-rng (virtio 1.2 section 5.4): fills each device-writable buffer with entropy
 * from an injected source (the host CSPRNG in the VMM), at most `maxRequestBytes` per
 * request, optionally rate-limited by a token bucket.
 */

import { type ActivateContext, drainQueue, VIRTIO_ID, type VirtioDevice } from "./device.ts";
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC } from "./queue.ts";

/** Where entropy comes from. */
export interface EntropySource {
  /** Fills `buf` with random bytes. */
  fill(buf: Uint8Array): void;
}

/** Options for the rng device. */
export interface RngOptions {
  /** Largest answer to one request (default 64 KiB). */
  maxRequestBytes?: number;
  /** Sustained rate limit in bytes per second (default: none). */
  rateBytesPerSec?: number;
  /** Clock in ms (injected for tests). */
  now?: () => number;
  /** Runs `fn` after `ms` (injected for tests). */
  later?: (fn: () => void, ms: number) => void;
}

const QUEUE_SIZE = 256;

/** The virtio entropy device. */
export class VirtioRng implements VirtioDevice {
  /** Device type. */
  readonly deviceType: number = VIRTIO_ID.RNG;
  /** Name. */
  readonly name = "virtio-rng";
  /** Offered features: ring features only. */
  readonly features: bigint = (1n << VIRTIO_F_INDIRECT_DESC) | (1n << VIRTIO_F_EVENT_IDX);
  /** One request queue. */
  readonly queueMaxSizes: readonly number[] = [QUEUE_SIZE];
  private ctx: ActivateContext | undefined;
  private readonly maxRequest: number;
  private tokens: number;
  private lastRefill: number;
  private waiting = false;
  private readonly now: () => number;
  private readonly later: (fn: () => void, ms: number) => void;
  /** Bytes handed to the guest so far. */
  bytesServed = 0;

  /** An rng device drawing from `source`. */
  constructor(private readonly source: EntropySource, private readonly opts: RngOptions = {}) {
    this.maxRequest = opts.maxRequestBytes ?? 65536;
    this.now = opts.now ?? (() => performance.now());
    this.later = opts.later ?? ((fn, ms) => setTimeout(fn, ms));
    this.tokens = opts.rateBytesPerSec ?? Infinity;
    this.lastRefill = this.now();
  }

  /** No config space. */
  readConfig(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }

  /** No config space. */
  writeConfig(): void {}

  /** Starts serving. */
  activate(ctx: ActivateContext): void {
    this.ctx = ctx;
    this.process();
  }

  /** The driver queued buffers. */
  notify(_index: number): void {
    this.process();
  }

  /** Drops the queue. */
  reset(): void {
    this.ctx = undefined;
  }

  /** Fills `b` from the source, at most 64 KiB per call (getRandomValues' limit). */
  private fillFrom(b: Uint8Array): void {
    if (b.length <= 65536) return this.source.fill(b);
    for (let off = 0; off < b.length; off += 65536) this.source.fill(b.subarray(off, off + 65536));
  }

  private refill(): void {
    const rate = this.opts.rateBytesPerSec;
    if (!rate) return;
    const t = this.now();
    // Bucket depth: one second of rate, at least one full request.
    this.tokens = Math.min(
      Math.max(rate, this.maxRequest),
      this.tokens + ((t - this.lastRefill) * rate) / 1000,
    );
    this.lastRefill = t;
  }

  private process(): void {
    const ctx = this.ctx;
    if (!ctx || this.waiting) return;
    const q = ctx.queues[0];
    if (!q?.ready) return;
    let used = false;
    const haveTokens = () => {
      this.refill();
      if (this.tokens >= 1) return true;
      // Come back when a minimal answer's worth of tokens has accrued.
      this.waiting = true;
      const ms = Math.max(1, Math.ceil((1 - this.tokens) * 1000 / this.opts.rateBytesPerSec!));
      this.later(() => {
        this.waiting = false;
        this.process();
      }, ms);
      return false;
    };
    const ok = drainQueue(ctx, q, (chain) => {
      const n = Math.min(chain.writableLen, this.maxRequest, Math.floor(this.tokens));
      // Straight into the guest's buffers: no host copy to allocate and collect.
      let left = n;
      for (const b of chain.writable) {
        if (left <= 0) break;
        const len = Math.min(b.length, left);
        this.fillFrom(len === b.length ? b : b.subarray(0, len));
        left -= len;
      }
      if (this.opts.rateBytesPerSec) this.tokens -= n;
      this.bytesServed += n;
      q.pushUsed(ctx.memory, chain.head, n);
      used = true;
      return true;
    }, haveTokens);
    if (!ok) return;
    if (used && q.needsInterrupt(ctx.memory)) ctx.interrupt.signalUsed(0);
  }
}
