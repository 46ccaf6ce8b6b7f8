/**
 * virtio-net (virtio 1.2 section 5.1): one receive and one transmit queue, no control
 * queue. Frames move between guest RAM and an injected backend (a TAP in the VMM) with
 * scatter-gather calls straight on the guest's buffers; the only host buffer is one
 * fixed overflow area per device that catches the tail of a frame too large for the
 * buffers the guest posted (such a frame is dropped and counted, never truncated).
 *
 * Receive reads the backend only while the guest has posted enough buffers for the
 * largest frame it can be sent; otherwise it stops watching the backend and resumes
 * on the next receive-queue notification, so an idle or hostile guest costs no host CPU
 * and pins no host memory whatever the network does. Transmit retries a frame the
 * backend could not take yet once the backend says it is writable again.
 */

import { type ActivateContext, drainQueue, readConfigBytes, VIRTIO_ID, type VirtioDevice } from "./device.ts";
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1 } from "./queue.ts";
import { ChainError, type DescChain, scatter } from "./chain.ts";

/** virtio-net feature bits (virtio 1.2 section 5.1.3). */
export const NET_F = {
  CSUM: 0n,
  GUEST_CSUM: 1n,
  MTU: 3n,
  MAC: 5n,
  GUEST_TSO4: 7n,
  GUEST_TSO6: 8n,
  GUEST_ECN: 9n,
  GUEST_UFO: 10n,
  HOST_TSO4: 11n,
  HOST_TSO6: 12n,
  HOST_ECN: 13n,
  MRG_RXBUF: 15n,
  STATUS: 16n,
} as const;

/** Link status bit of the config space's status field. */
export const VIRTIO_NET_S_LINK_UP = 1;

/** Receive offloads for the backend, from the features the driver acknowledged. */
export interface NetOffloads {
  /** The guest takes frames with a partial checksum (GUEST_CSUM). */
  csum: boolean;
  /** The guest takes TCPv4 segmentation offload frames. */
  tso4: boolean;
  /** The guest takes TCPv6 segmentation offload frames. */
  tso6: boolean;
  /** The guest takes TSO frames with ECN (CWR) set. */
  ecn: boolean;
  /** The guest takes UDP fragmentation offload frames. */
  ufo: boolean;
}

/** Where frames come from and go (a TAP in the VMM). Frames carry the virtio-net header. */
export interface NetBackend {
  /**
   * Reads one frame (header + Ethernet frame) into `bufs`, in order. Returns its length,
   * or a negative errno: -11 (EAGAIN) when no frame is waiting. A return larger than the
   * buffers' total means the frame did not fit.
   */
  readFrame(bufs: Uint8Array[]): number;
  /** Writes one frame made of `bufs`. Returns bytes written or a negative errno (-11: try later). */
  writeFrame(bufs: Uint8Array[]): number;
  /** The header length frames carry from now on (10 or 12 bytes). */
  setHeaderSize(bytes: number): void;
  /** The receive offloads the guest accepts from now on. */
  setOffloads(o: NetOffloads): void;
  /** Calls `fn` whenever a frame may be waiting; undefined stops watching. */
  onReadable(fn: (() => void) | undefined): void;
  /** Calls `fn` once the backend can take frames again; undefined stops watching. */
  onWritable(fn: (() => void) | undefined): void;
}

/** Options of a net device. */
export interface NetOptions {
  /** The MAC address the guest is told (6 bytes). */
  mac: Uint8Array;
  /** MTU advertised with VIRTIO_NET_F_MTU (default: not offered; the guest uses 1500). */
  mtu?: number;
}

/** Frame and drop counters of a net device. */
export interface NetStats {
  /** Frames delivered to the guest. */
  rxFrames: number;
  /** Bytes delivered to the guest, headers excluded. */
  rxBytes: number;
  /** Frames sent by the guest. */
  txFrames: number;
  /** Bytes sent by the guest, headers excluded. */
  txBytes: number;
  /** Received frames larger than the buffers the guest posted: dropped. */
  rxDropTooBig: number;
  /** Receive chains with device-readable buffers or no room for the header: returned empty. */
  rxBadChain: number;
  /** Backend read errors other than "nothing waiting". */
  rxErrors: number;
  /** Transmit chains shorter than the header or with device-writable buffers: dropped. */
  txDropBadChain: number;
  /** Transmit chains over 64 KiB plus headers: dropped. */
  txDropTooBig: number;
  /** Frames the backend refused (a bad GSO header, say): dropped. */
  txErrors: number;
  /** Times the backend was full and transmit waited for it. */
  txBlocked: number;
  /** Times receive stopped watching the backend for lack of guest buffers. */
  rxStarved: number;
}

const RX = 0;
const TX = 1;
const QUEUE_SIZE = 256;
const EAGAIN = 11;
/** Largest Ethernet frame after GSO: a 64 KiB IP packet, the Ethernet header and a VLAN tag. */
export const MAX_GSO_FRAME: number = 65536 + 14 + 4;
/** Ethernet and VLAN header on top of the MTU. */
const ETH_OVERHEAD = 14 + 4;
/** Frames handled per pass before the device yields to the event loop. */
const BUDGET = 256;
/** Buffers in one scatter-gather call (IOV_MAX is 1024; one slot is the overflow area). */
const MAX_IOV = 1000;

function bit(features: bigint, b: bigint): boolean {
  return (features & (1n << b)) !== 0n;
}

/** The virtio network device. */
export class VirtioNet implements VirtioDevice {
  /** Device type. */
  readonly deviceType: number = VIRTIO_ID.NET;
  /** Name. */
  readonly name = "virtio-net";
  /** Offered features. */
  readonly features: bigint;
  /** Receive and transmit queue. */
  readonly queueMaxSizes: readonly number[] = [QUEUE_SIZE, QUEUE_SIZE];
  /** Counters. */
  readonly stats: NetStats = {
    rxFrames: 0,
    rxBytes: 0,
    txFrames: 0,
    txBytes: 0,
    rxDropTooBig: 0,
    rxBadChain: 0,
    rxErrors: 0,
    txDropBadChain: 0,
    txDropTooBig: 0,
    txErrors: 0,
    txBlocked: 0,
    rxStarved: 0,
  };
  private readonly config = new Uint8Array(12);
  private ctx: ActivateContext | undefined;
  private hdrLen = 12;
  private mergeable = false;
  private rxFrameMax = 0;
  /** Receive chains taken off the ring and not yet used (at most the queue size). */
  private stash: DescChain[] = [];
  private stashBytes = 0;
  private stashRing = -1;
  private rxWatching = false;
  private txWaiting = false;
  /** A pass of each queue is scheduled after a full budget. */
  private readonly pendingLater = [false, false];
  /** Receives a frame's tail when it is larger than the guest's buffers. */
  private readonly overflow = new Uint8Array(MAX_GSO_FRAME + 12);
  /** The stashed chains' buffers in order, the overflow area last (the receive call's iovec list). */
  private stashIov: Uint8Array[] = [this.overflow];
  private readonly readable = () => this.receive();
  private readonly writable = () => {
    this.txWaiting = false;
    this.backend.onWritable(undefined);
    this.transmit();
  };

  /** A net device on `backend`. */
  constructor(private readonly backend: NetBackend, opts: NetOptions) {
    if (opts.mac.length !== 6) throw new RangeError("a MAC address has 6 bytes");
    this.config.set(opts.mac, 0);
    this.config[6] = VIRTIO_NET_S_LINK_UP;
    let f = 0n;
    for (
      const b of [
        NET_F.CSUM,
        NET_F.GUEST_CSUM,
        NET_F.MAC,
        NET_F.GUEST_TSO4,
        NET_F.GUEST_TSO6,
        NET_F.GUEST_ECN,
        NET_F.HOST_TSO4,
        NET_F.HOST_TSO6,
        NET_F.HOST_ECN,
        NET_F.MRG_RXBUF,
        NET_F.STATUS,
        VIRTIO_F_EVENT_IDX,
        VIRTIO_F_INDIRECT_DESC,
      ]
    ) f |= 1n << b;
    if (opts.mtu !== undefined) {
      if (!Number.isInteger(opts.mtu) || opts.mtu < 68 || opts.mtu > 65535) {
        throw new RangeError(`MTU ${opts.mtu} is not from 68 to 65535`);
      }
      f |= 1n << NET_F.MTU;
      this.config[10] = opts.mtu & 0xff;
      this.config[11] = opts.mtu >> 8;
    }
    this.features = f;
  }

  private get mtu(): number {
    return bit(this.features, NET_F.MTU) ? this.config[10] | (this.config[11] << 8) : 1500;
  }

  /** mac, status, max_virtqueue_pairs (0: no multiqueue), mtu. */
  readConfig(offset: number, data: Uint8Array): void {
    readConfigBytes(this.config, offset, data);
  }

  /** The config space is read-only (the MAC too: VIRTIO_NET_F_CTRL_MAC_ADDR is not offered). */
  writeConfig(): void {}

  /** Starts the device: header size and offloads from the acknowledged features. */
  activate(ctx: ActivateContext): void {
    const f = ctx.features;
    this.mergeable = bit(f, NET_F.MRG_RXBUF);
    this.hdrLen = this.mergeable || bit(f, VIRTIO_F_VERSION_1) ? 12 : 10;
    const csum = bit(f, NET_F.GUEST_CSUM);
    // The kernel refuses segmentation offloads without checksum offload.
    const o: NetOffloads = {
      csum,
      tso4: csum && bit(f, NET_F.GUEST_TSO4),
      tso6: csum && bit(f, NET_F.GUEST_TSO6),
      ecn: false,
      ufo: csum && bit(f, NET_F.GUEST_UFO),
    };
    o.ecn = (o.tso4 || o.tso6) && bit(f, NET_F.GUEST_ECN);
    const gso = o.tso4 || o.tso6 || o.ufo;
    this.rxFrameMax = this.hdrLen + (gso ? MAX_GSO_FRAME : this.mtu + ETH_OVERHEAD);
    this.backend.setHeaderSize(this.hdrLen);
    this.backend.setOffloads(o);
    this.ctx = ctx;
    this.clearStash();
    this.transmit();
    this.watchRx(true);
  }

  /** The driver posted receive buffers or queued frames. */
  notify(index: number): void {
    if (index === RX) {
      this.receive();
    } else if (index === TX) this.transmit();
  }

  /** Stops: nothing is read or written after this returns (both paths are synchronous). */
  reset(): void {
    this.ctx = undefined;
    this.clearStash();
    this.watchRx(false);
    if (this.txWaiting) this.backend.onWritable(undefined);
    this.txWaiting = false;
    this.backend.setOffloads({ csum: false, tso4: false, tso6: false, ecn: false, ufo: false });
  }

  /** The counters, for failure reports. */
  describe(): string {
    return Object.entries(this.stats).map(([k, v]) => `${k}=${v}`).join(" ");
  }

  private clearStash(): void {
    this.stash = [];
    this.stashBytes = 0;
    this.stashIov = [this.overflow];
  }

  private watchRx(on: boolean): void {
    if (on === this.rxWatching) return;
    this.rxWatching = on;
    this.backend.onReadable(on ? this.readable : undefined);
  }

  /** Takes receive chains until one frame of the largest size fits (or the ring is empty). */
  private fillStash(ctx: ActivateContext): boolean {
    const q = ctx.queues[RX];
    if (this.stashRing !== q.descAddr) {
      this.clearStash(); // the queue was set up again
      this.stashRing = q.descAddr;
    }
    let full = this.stash.length >= q.size;
    while (!full && (this.mergeable ? this.stashBytes < this.rxFrameMax : this.stash.length === 0)) {
      const c = q.pop(ctx.memory);
      if (!c) {
        if (q.enableNotification(ctx.memory)) continue;
        break;
      }
      if (c.readableLen > 0 || c.writableLen < this.hdrLen || c.writable.length > MAX_IOV) {
        // Not a receive buffer: given back unused, and the queue goes on.
        this.stats.rxBadChain++;
        q.pushUsed(ctx.memory, c.head, 0);
        continue;
      }
      if (this.stashIov.length + c.writable.length > MAX_IOV + 1) {
        q.unpop(); // it goes first into the next frame's list
        full = true;
        break;
      }
      this.stash.push(c);
      this.stashBytes += c.writableLen;
      this.stashIov.splice(this.stashIov.length - 1, 0, ...c.writable);
      full = this.stash.length >= q.size;
    }
    if (this.stash.length === 0) return false;
    if (!this.mergeable) return true;
    // A ring the guest has filled, or a full iovec list, cannot grow: read into what there is.
    return full || this.stashBytes >= this.rxFrameMax;
  }

  private receive(): void {
    const ctx = this.ctx;
    if (!ctx) return;
    const q = ctx.queues[RX];
    if (!q?.ready) {
      this.watchRx(false);
      return;
    }
    const mem = ctx.memory;
    let delivered = 0;
    try {
      for (let n = 0; n < BUDGET; n++) {
        if (!this.fillStash(ctx)) {
          // Out of buffers: stop reading until the driver posts more (its notify calls us).
          if (this.rxWatching) this.stats.rxStarved++;
          this.watchRx(false);
          break;
        }
        this.watchRx(true);
        const got = this.backend.readFrame(this.stashIov);
        if (got === -EAGAIN) break;
        if (got < 0) {
          this.stats.rxErrors++;
          break;
        }
        if (got > this.stashBytes || got < this.hdrLen) {
          // Too large for what the guest posted: the buffers stay for the next frame.
          this.stats.rxDropTooBig++;
          continue;
        }
        let chains = 0;
        for (let left = got; left > 0; chains++) left -= this.stash[chains].writableLen;
        if (this.hdrLen === 12) {
          scatter(this.stash[0].writable, 10, new Uint8Array([chains & 0xff, chains >> 8]));
        }
        let left = got;
        let usedBufs = 0;
        for (let i = 0; i < chains; i++) {
          const c = this.stash[i];
          const len = Math.min(left, c.writableLen);
          q.pushUsed(mem, c.head, len);
          left -= len;
          this.stashBytes -= c.writableLen;
          usedBufs += c.writable.length;
        }
        this.stash = this.stash.slice(chains);
        this.stashIov.splice(0, usedBufs);
        this.stats.rxFrames++;
        this.stats.rxBytes += got - this.hdrLen;
        delivered++;
      }
      if (delivered && q.needsInterrupt(mem)) ctx.interrupt.signalUsed(RX);
    } catch (e) {
      if (!(e instanceof ChainError)) throw e;
      this.watchRx(false);
      ctx.interrupt.needsReset(e.message);
      return;
    }
    if (delivered >= BUDGET) this.later(RX);
  }

  /** After a full budget: let the other handlers run, then go on with queue `index`. */
  private later(index: number): void {
    if (this.pendingLater[index]) return;
    this.pendingLater[index] = true;
    setTimeout(() => {
      this.pendingLater[index] = false;
      if (index === RX) this.receive();
      else this.transmit();
    }, 0);
  }

  private transmit(): void {
    const ctx = this.ctx;
    if (!ctx || this.txWaiting) return;
    const q = ctx.queues[TX];
    if (!q?.ready) return;
    const mem = ctx.memory;
    let done = 0;
    const ok = drainQueue(ctx, q, (c) => {
      const s = this.stats;
      if (c.writableLen > 0 || c.readableLen < this.hdrLen) {
        s.txDropBadChain++;
      } else if (c.readableLen - this.hdrLen > MAX_GSO_FRAME) {
        s.txDropTooBig++;
      } else {
        const r = this.backend.writeFrame(c.readable);
        if (r === -EAGAIN) {
          // The backend is full: this chain goes first once it can take frames again.
          q.unpop();
          s.txBlocked++;
          this.txWaiting = true;
          this.backend.onWritable(this.writable);
          return false;
        }
        if (r < 0) {
          s.txErrors++;
        } else {
          s.txFrames++;
          s.txBytes += c.readableLen - this.hdrLen;
        }
      }
      q.pushUsed(mem, c.head, 0);
      done++;
      return true;
    }, () => done < BUDGET);
    if (!ok) return;
    // A frame sent to the host's own stack is usually answered before the write returns (a
    // ping, a TCP ACK): take the answer now, so its interrupt goes out with this pass's.
    if (done && this.rxWatching) this.receive();
    if (done && q.needsInterrupt(mem)) ctx.interrupt.signalUsed(TX);
    if (done >= BUDGET) this.later(TX);
  }
}
