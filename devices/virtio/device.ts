/**
 * What a virtio device is, independent of its transport (docs/DESIGN.md section 1): type,
 * features, config space, queues, activate and reset. Transports own status, selectors
 * and register layout; devices never know which one carries them.
 */

import type { GuestMemory } from "../../vmm/memory.ts";
import type { SplitQueue } from "./queue.ts";
import { ChainError, type DescChain } from "./chain.ts";

/** Virtio device IDs (virtio 1.2 section 5). */
export const VIRTIO_ID = { NET: 1, BLOCK: 2, RNG: 4 } as const;

/** Device status bits (virtio 1.2 section 2.1). */
export const STATUS = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 64,
  FAILED: 128,
} as const;

/** How a device reaches its driver. */
export interface VirtioInterrupt {
  /** Used buffers were added to queue `index`. */
  signalUsed(index: number): void;
  /** The config space changed. */
  signalConfig(): void;
  /** The device met a driver error it cannot go on from (sets DEVICE_NEEDS_RESET). */
  needsReset(reason: string): void;
}

/** What a device gets when the driver sets DRIVER_OK. */
export interface ActivateContext {
  /** Guest RAM. */
  memory: GuestMemory;
  /** The queues, configured and validated by the transport (index = queue number). */
  queues: SplitQueue[];
  /** Features the driver acknowledged. */
  features: bigint;
  /** Interrupts back to the driver. */
  interrupt: VirtioInterrupt;
}

/** A virtio device. */
export interface VirtioDevice {
  /** Virtio device ID. */
  readonly deviceType: number;
  /** A short name for logs ("virtio-blk"). */
  readonly name: string;
  /** Device-specific and ring feature bits offered (the transport adds VERSION_1 on modern). */
  readonly features: bigint;
  /** Maximum size of each queue; the length is the queue count. */
  readonly queueMaxSizes: readonly number[];
  /** Reads device config space at `offset` into `data`. */
  readConfig(offset: number, data: Uint8Array): void;
  /** Writes device config space. */
  writeConfig(offset: number, data: Uint8Array): void;
  /** Starts the device. */
  activate(ctx: ActivateContext): void;
  /** Queue `index` was notified by the driver. */
  notify(index: number): void;
  /**
   * Requests taken and not answered yet, whose answer waits on a promise (a disk transfer,
   * say). A device without it answers every request before `notify` returns or from a
   * timer; the device thread then blocks again right after a wake (vmm/event_loop.ts).
   */
  readonly pending?: number;
  /**
   * Stops the device and drops all queue state: nothing new starts and in-flight work will
   * not touch the rings. When work that reads or writes guest memory is still running (a
   * disk read into a guest buffer, say), returns a promise that settles once it has all
   * finished; the transport does not report the reset complete before then (virtio 1.2
   * section 2.4: after a reset the device must not interact with the guest's buffers).
   */
  reset(): void | Promise<void>;
  /** Device-specific state for failure reports (counters, say); optional. */
  describe?(): string;
}

/** Reads a little-endian config space image at `offset` (out-of-range bytes read as 0). */
export function readConfigBytes(config: Uint8Array, offset: number, data: Uint8Array): void {
  data.fill(0);
  for (let i = 0; i < data.length; i++) {
    const o = offset + i;
    if (o >= 0 && o < config.length) data[i] = config[o];
  }
}

/**
 * Takes chains off `q` and hands each to `take` until the queue is empty (re-arming the
 * driver's notifications), `take` returns false, or `more` says to stop before popping.
 * A broken ring or chain asks the driver for a reset; returns false then.
 */
export function drainQueue(
  ctx: ActivateContext,
  q: SplitQueue,
  take: (chain: DescChain) => boolean,
  more: () => boolean = () => true,
): boolean {
  try {
    while (more()) {
      const chain = q.pop(ctx.memory);
      if (!chain) {
        if (q.enableNotification(ctx.memory)) continue;
        break;
      }
      if (!take(chain)) break;
    }
    return true;
  } catch (e) {
    if (e instanceof ChainError) {
      ctx.interrupt.needsReset(e.message);
      return false;
    }
    throw e;
  }
}
