/**
 * A seeded, replayable fuzzer for the virtio devices and transports, driven from the
 * driver side in plain memory (no KVM). Each episode sets up one device ("the target")
 * on one transport beside a bystander device, then mixes well-formed requests whose
 * outcome an independent model predicts with hostile input: mutated descriptor chains and
 * indirect tables, ring index jumps, notifications of any queue, register accesses of any
 * offset, width and value in every status state, and resets with I/O in flight.
 *
 * The oracle, checked as it goes:
 * - every used entry names a chain the driver made available, once; for well-formed
 *   requests the id, length, status and data are the model's;
 * - no byte of RAM changes outside what a request may write (its device-writable
 *   buffers, the used rings, the zone hostile chains point into), and none at all after
 *   the driver saw a reset complete; guard bytes around RAM never change;
 * - the disk image matches a shadow copy the model keeps;
 * - without FLUSH negotiated, every write was synced before it completed;
 * - the bystander device keeps serving; no call throws; RSS stays bounded.
 *
 * `seed` and episode number determine every action of an episode (the timing of disk
 * I/O does not; a failure prints both so the episode can be run again alone).
 */

import { GuestMemory } from "../../vmm/memory.ts";
import { FileBackend } from "../../vmm/block_file.ts";
import { VirtioMmio } from "../../transports/mmio.ts";
import { VirtioMmioLegacy } from "../../transports/mmio_legacy.ts";
import { VirtioPci } from "../../transports/pci.ts";
import { CMD } from "../../devices/pci/config_space.ts";
import type { MmioRegisterFile } from "../../transports/mmio_core.ts";
import { VirtioBlk } from "../../devices/virtio/blk.ts";
import { BLK_S, BLK_T } from "../../devices/virtio/blk_request.ts";
import { VirtioRng } from "../../devices/virtio/rng.ts";
import { STATUS, type VirtioDevice } from "../../devices/virtio/device.ts";
import type { BlockBackend } from "../../devices/virtio/blk_backend.ts";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../../devices/virtio/chain.ts";

/** The transports the fuzzer drives. */
export const FUZZ_TRANSPORTS = ["mmio", "mmio-legacy", "pci", "pci-legacy", "pci-transitional"] as const;
/** The devices the fuzzer drives. */
export const FUZZ_DEVICES = ["blk", "rng"] as const;

/** What to run. */
export interface FuzzOptions {
  /** The run's seed. */
  seed: number;
  /** Episodes to run, starting at `firstEpisode` (default 0). */
  episodes: number;
  /** First episode number. */
  firstEpisode?: number;
  /** Stop once this many chains were made available (default: no limit). */
  maxChains?: number;
  /** Stop after this many milliseconds (default: no limit). */
  maxMs?: number;
  /** Call the garbage collector often and allocate junk (needs `--v8-flags=--expose-gc`). */
  gcPressure?: boolean;
  /** Only these transports / devices (default: all). */
  transports?: readonly string[];
  /** Only these devices. */
  devices?: readonly string[];
  /** Print each action (for replaying one episode). */
  verbose?: boolean;
  /** Stop at the first failure (default true). */
  stopOnFailure?: boolean;
  /** Builds the blk device under test (tests inject a broken one to see the oracle catch it). */
  makeBlk?: (backend: BlockBackend, serial: string) => VirtioBlk;
  /**
   * Keeps a virtio-MMIO window's register page (default: the transport's `keepCopy`; tests
   * inject a broken one to see the oracle catch it). Returns where the driver's writes go.
   */
  keepCopy?: (file: MmioRegisterFile, words: Int32Array) => Regs;
}

/** One failed check. */
export interface FuzzFailure {
  /** Seed and episode that reproduce it. */
  seed: number;
  /** Episode number. */
  episode: number;
  /** Device and transport. */
  target: string;
  /** What was wrong. */
  message: string;
}

/** What a run did. */
export interface FuzzReport {
  /** Episodes run. */
  episodes: number;
  /** Descriptor chains made available (well-formed and hostile). */
  chains: number;
  /** Of those, hostile. */
  hostileChains: number;
  /** Register accesses outside the normal driver sequence. */
  registerAccesses: number;
  /** Resets issued with requests in flight. */
  resetsInFlight: number;
  /** virtio-blk transfers the device made at once (`transferNow`), not through a promise. */
  blkAtOnce: number;
  /** Times a device asked for a reset. */
  needsReset: number;
  /** Failures (empty when everything held). */
  failures: FuzzFailure[];
  /** Wall time. */
  ms: number;
  /** Highest RSS seen, bytes. */
  maxRss: number;
}

/** A report of nothing done yet. */
export function emptyReport(): FuzzReport {
  return {
    episodes: 0,
    chains: 0,
    hostileChains: 0,
    registerAccesses: 0,
    resetsInFlight: 0,
    blkAtOnce: 0,
    needsReset: 0,
    failures: [],
    ms: 0,
    maxRss: 0,
  };
}

/** splitmix32: a small seeded generator; the same seed gives the same sequence. */
export class Prng {
  private s: number;
  /** A generator from a 32-bit seed. */
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  /** Next 32-bit value. */
  u32(): number {
    this.s = (this.s + 0x9e3779b9) >>> 0;
    let z = this.s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  }
  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor((this.u32() / 2 ** 32) * n);
  }
  /** True with probability p. */
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }
  /** One of `xs`. */
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
}

/** The seed of one episode: the run's seed mixed with the episode number. */
export function episodeSeed(seed: number, episode: number): number {
  return new Prng((seed ^ Math.imul(episode + 1, 0x27d4eb2d)) >>> 0).u32();
}

class Failure extends Error {}

const BASE = 0x10_0000; // RAM starts at 1 MiB: address math is exercised
const RAM = 512 * 1024;
const GUARD = 4096;
const GUARD_BYTE = 0xa5;
// RAM layout (offsets from BASE).
const RING_TARGET = 0x0000; // 3 pages: desc | avail ... | used (legacy layout, 4096 alignment)
const RING_BYSTANDER = 0x3000;
const VALID_ZONE = [0x8000, 0x48000] as const;
const HOSTILE_ZONE = [0x48000, RAM] as const; // to the end of RAM: a longer buffer is outside it
const SECTOR = 512;
const DISK_SECTORS = 1024; // 512 KiB image
const RNG_FILL = 0x5c;

/** A backend around the image file that records what the oracle needs. */
class WatchedBackend implements BlockBackend {
  readonly size: number;
  readonly readonly = false;
  readonly identity = "fuzz-image";
  pending = 0;
  /** Byte offsets of completed writes not yet followed by a completed flush. */
  readonly unsynced = new Set<number>();
  constructor(private readonly file: FileBackend, private readonly report: FuzzReport) {
    this.size = file.size;
  }
  /** Calls running now. */
  readonly running = new Set<Promise<unknown>>();
  private async track<T>(p: () => Promise<T>): Promise<T> {
    this.pending++;
    const call = p();
    this.running.add(call);
    try {
      return await call;
    } finally {
      this.running.delete(call);
      this.pending--;
    }
  }
  /** Every other transfer the device offers is taken at once, so both of its paths are fuzzed. */
  private nowTurn = false;
  transferNow(write: boolean, bufs: Uint8Array[], offset: number): boolean {
    this.nowTurn = !this.nowTurn;
    if (!this.nowTurn || !this.file.transferNow(write, bufs, offset)) return false;
    if (write) this.unsynced.add(offset);
    this.report.blkAtOnce++;
    return true;
  }
  read(bufs: Uint8Array[], offset: number): Promise<void> {
    return this.track(() => this.file.read(bufs, offset));
  }
  write(bufs: Uint8Array[], offset: number): Promise<void> {
    return this.track(async () => {
      await this.file.write(bufs, offset);
      this.unsynced.add(offset);
    });
  }
  flush(): Promise<void> {
    const before = new Set(this.unsynced);
    return this.track(async () => {
      await this.file.flush();
      for (const o of before) this.unsynced.delete(o);
    });
  }
  discard(offset: number, len: number): Promise<void> {
    return this.track(() => this.file.discard(offset, len));
  }
  writeZeroes(offset: number, len: number, unmap: boolean): Promise<void> {
    return this.track(() => this.file.writeZeroes(offset, len, unmap));
  }
  close(): Promise<void> {
    return Promise.resolve(); // the run owns the file
  }
}

/** A well-formed request the model predicts. */
interface Expect {
  head: number;
  slots: number[];
  /** Used length. */
  len: number;
  /** Device-writable buffers: [gpa, expected bytes after completion]. */
  writes: Array<[number, Uint8Array]>;
  /** Sectors [first, end) this request reads or writes, and whether it writes. */
  range?: [number, number, boolean];
  /** Image bytes after an OK write (at range[0]). */
  image?: Uint8Array;
  kind: string;
}

interface Queue {
  size: number;
  desc: number;
  avail: number;
  used: number;
  availIdx: number;
  lastUsed: number;
  free: number[];
}

/** One fuzzing run's shared resources (RAM, image) and counters. */
class Run {
  readonly buffer = new ArrayBuffer(RAM + 2 * GUARD);
  readonly all = new Uint8Array(this.buffer);
  readonly ram = new Uint8Array(this.buffer, GUARD, RAM);
  readonly mem = new GuestMemory([{ gpa: BASE, bytes: this.ram }]);
  /** What RAM must hold outside the bytes the device may write. */
  readonly expected = new Uint8Array(RAM);
  readonly ram32 = new Uint32Array(this.buffer, GUARD, RAM / 4);
  readonly expected32 = new Uint32Array(this.expected.buffer);
  readonly report: FuzzReport = emptyReport();
  shadow = new Uint8Array(DISK_SECTORS * SECTOR);
  /** The image, open for the oracle's reads. */
  readonly imageFile: Deno.FsFile;
  /** Forces a collection: a scavenge of the young generation, and a full one every 16th time. */
  readonly gc: (() => void) | undefined;
  private gcs = 0;
  constructor(readonly opts: FuzzOptions, readonly image: string, readonly file: FileBackend) {
    const v8gc = (globalThis as { gc?: (o?: { type: string; execution: string }) => void }).gc;
    if (opts.gcPressure && !v8gc) throw new Error("GC pressure needs --v8-flags=--expose-gc");
    // Short-lived buffers (an iovec made for one call) die young: scavenges find them.
    this.gc = opts.gcPressure && v8gc
      ? () => v8gc(++this.gcs % 16 === 0 ? undefined : { type: "minor", execution: "sync" })
      : undefined;
    this.imageFile = Deno.openSync(image, { read: true });
  }
}

/** Register access of a transport, with the offsets a storm aims at. */
export interface Regs {
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void | Promise<void>;
}

/** How the fuzzer's driver reaches the target, whatever the transport. */
interface Port {
  /** Register accesses for storms: offsets that mean something, and the span of the rest. */
  readonly regs: Regs;
  readonly stormOffsets: readonly number[];
  readonly stormSpan: number;
  status(): number;
  setStatus(v: number): Promise<void>;
  deviceFeatures(): bigint;
  /** Features, queue 0 at desc/avail/used with `size` entries, FEATURES_OK (where there is one). */
  configure(features: bigint, size: number, desc: number, avail: number, used: number): Promise<void>;
  notify(index: number): void | Promise<void>;
  /** virtio-MMIO: where the read-only register page disagrees with the registers. */
  pageMismatch?(): string | undefined;
}

async function w(regs: Regs, off: number, size: number, v: number): Promise<void> {
  const d = new Uint8Array(size);
  for (let i = 0; i < size; i++) d[i] = Math.floor(v / 2 ** (8 * i)) & 0xff;
  const r = regs.write(off, d);
  if (r instanceof Promise) await r;
}

function r(regs: Regs, off: number, size: number): number {
  const d = new Uint8Array(size);
  regs.read(off, d);
  return d.reduce((v, b, i) => v + b * 2 ** (8 * i), 0);
}

const MMIO_STORM = [
  0x000,
  0x004,
  0x008,
  0x00c,
  0x010,
  0x014,
  0x020,
  0x024,
  0x028,
  0x030,
  0x034,
  0x038,
  0x03c,
  0x040,
  0x044,
  0x050,
  0x060,
  0x064,
  0x070,
  0x080,
  0x084,
  0x090,
  0x094,
  0x0a0,
  0x0a4,
  0x0ac,
  0x0b0,
  0x0fc,
  0x100,
  0x108,
  0x13c,
];

/** virtio-MMIO, either version. */
class MmioPort implements Port {
  readonly stormOffsets = MMIO_STORM;
  readonly stormSpan = 0x1000;
  /**
   * The window as a guest with the register page mapped sees it (vmm/virtio_mmio_bus.ts):
   * reads from the page, writes through `keepCopy`.
   */
  readonly regs: Regs;
  private readonly page: Uint8Array;
  constructor(
    readonly file: MmioRegisterFile,
    readonly modern: boolean,
    keepCopy = (f: MmioRegisterFile, words: Int32Array): Regs => f.keepCopy(words, 0),
  ) {
    // The transport's InterruptStatus cell is a word of the page (makeTransport).
    const words = file.core.isr.array;
    const writes = keepCopy(file, words);
    this.page = new Uint8Array(words.buffer);
    this.regs = {
      read: (o, d) => {
        // Past the page, as off the window: the register file's own answer.
        if (o + d.length > this.page.length) file.read(o, d);
        else d.set(this.page.subarray(o, o + d.length));
      },
      write: (o, d) => writes.write(o, d),
    };
  }
  /** Where the page disagrees with the register file (registers and the first 256 bytes of config). */
  pageMismatch(): string | undefined {
    const d = new Uint8Array(4);
    for (let off = 0; off < 0x200; off += 4) {
      this.file.read(off, d);
      for (let i = 0; i < 4; i++) {
        if (this.page[off + i] !== d[i]) {
          return `the register page differs from the registers at 0x${off.toString(16)}`;
        }
      }
    }
    return undefined;
  }
  status(): number {
    return r(this.regs, 0x070, 4);
  }
  setStatus(v: number): Promise<void> {
    return w(this.regs, 0x070, 4, v);
  }
  deviceFeatures(): bigint {
    let f = 0n;
    for (const sel of [0, 1]) {
      this.regs.write(0x014, new Uint8Array([sel, 0, 0, 0]));
      f |= BigInt(r(this.regs, 0x010, 4)) << BigInt(32 * sel);
    }
    return f;
  }
  async configure(features: bigint, size: number, desc: number, avail: number, used: number): Promise<void> {
    const t = this.regs;
    await w(t, 0x024, 4, 0);
    await w(t, 0x020, 4, Number(features & 0xffff_ffffn));
    if (this.modern) {
      await w(t, 0x024, 4, 1);
      await w(t, 0x020, 4, Number(features >> 32n));
      await this.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
      await w(t, 0x030, 4, 0);
      await w(t, 0x038, 4, size);
      for (const [reg, a] of [[0x080, desc], [0x090, avail], [0x0a0, used]]) {
        await w(t, reg, 4, a % 2 ** 32);
        await w(t, reg + 4, 4, Math.floor(a / 2 ** 32));
      }
      await w(t, 0x044, 4, 1);
    } else {
      await w(t, 0x028, 4, 4096);
      await w(t, 0x030, 4, 0);
      await w(t, 0x038, 4, size);
      await w(t, 0x03c, 4, 4096);
      await w(t, 0x040, 4, desc / 4096);
    }
  }
  notify(index: number): void | Promise<void> {
    const d = new Uint8Array(4);
    new DataView(d.buffer).setUint32(0, index >>> 0, true);
    // As the ioeventfd on QueueNotify does: straight to the device, past the page's upkeep,
    // so what the request changes (NEEDS_RESET) reaches the page only through onChange.
    return this.file.write(0x050, d);
  }
}

/** Config space lives at this offset of a PCI port's register space, the BAR below it. */
const PCI_CONFIG_BASE = 0x10000;

/** Where a PCI port's register space puts each BAR (config space is at PCI_CONFIG_BASE). */
const PCI_SPACE = { modern: 0x0000, legacy: 0x8000, msix: 0xa000 } as const;

/**
 * virtio-PCI, any flavour: the modern BAR at 0, the legacy I/O BAR at 0x8000, the MSI-X BAR
 * of legacy and transitional functions at 0xa000, configuration space at 0x10000. The
 * driver path is modern or legacy (`legacy`); storms hit every interface, so a transitional
 * function sees drivers that mix them.
 */
class PciPort implements Port {
  readonly stormOffsets: readonly number[];
  readonly stormSpan = 0x10120;
  readonly regs: Regs;
  constructor(readonly t: VirtioPci, readonly legacy: boolean) {
    t.config.setCommand(CMD.IO | CMD.MEMORY | CMD.BUS_MASTER);
    const bars = t.barHandlers();
    const io = bars.find((h) => h.kind === "io");
    const msix = bars.find((h) => h.kind === "mem32");
    const modern = t.flavor !== "legacy";
    const route = (o: number): [(typeof bars)[number] | undefined, number] => {
      if (o >= PCI_SPACE.msix) return [msix, o - PCI_SPACE.msix];
      if (o >= PCI_SPACE.legacy) return [io, o - PCI_SPACE.legacy];
      return [modern ? bars.find((h) => h.kind === "mem64") : undefined, o];
    };
    this.regs = {
      read: (o, d) => {
        if (o >= PCI_CONFIG_BASE) return t.config.read(o - PCI_CONFIG_BASE, d);
        const [h, off] = route(o);
        if (h && off < h.size) h.read(off, d);
        else d.fill(0xff);
      },
      write: (o, d) => {
        // The header's BARs and command register are the bus's business, not the device's.
        if (o >= PCI_CONFIG_BASE) {
          if (o - PCI_CONFIG_BASE >= 0x40) t.config.write(o - PCI_CONFIG_BASE, d);
          return;
        }
        const [h, off] = route(o);
        if (h && off < h.size) return h.write(off, d);
      },
    };
    const cfg = (o: number) => PCI_CONFIG_BASE + o;
    this.stormOffsets = [
      ...(modern ? Array.from({ length: 0x3c / 2 }, (_, i) => 2 * i) : []), // common config, every field
      ...(modern ? [0x1000, 0x2000, 0x2008, 0x2014, 0x3000, 0x3004, 0x3002] : []), // ISR, config, doorbells
      ...(modern && t.flavor === "modern" ? [0x4000, 0x4004, 0x4008, 0x400c, 0x4010, 0x401c, 0x6000] : []),
      ...(io ? [0, 4, 8, 12, 14, 16, 18, 19, 20, 22, 24, 28].map((o) => PCI_SPACE.legacy + o) : []),
      ...(msix ? [0, 4, 8, 12, 16, 28, 0x1000].map((o) => PCI_SPACE.msix + o) : []),
      cfg(0x40),
      cfg(0x42),
      cfg(0x44),
      cfg(0x48), // MSI-X capability
      ...Array.from({ length: 24 }, (_, i) => cfg(0x4c + 4 * i)), // virtio capabilities, PCI_CFG window
    ];
  }
  private get statusReg(): [number, number] {
    return this.legacy ? [PCI_SPACE.legacy + 18, 1] : [0x14, 1];
  }
  status(): number {
    return r(this.regs, ...this.statusReg);
  }
  setStatus(v: number): Promise<void> {
    const [o, n] = this.statusReg;
    return w(this.regs, o, n, v);
  }
  deviceFeatures(): bigint {
    if (this.legacy) return BigInt(r(this.regs, PCI_SPACE.legacy, 4));
    let f = 0n;
    for (const sel of [0, 1]) {
      this.regs.write(0x00, new Uint8Array([sel, 0, 0, 0]));
      f |= BigInt(r(this.regs, 0x04, 4)) << BigInt(32 * sel);
    }
    return f;
  }
  async configure(features: bigint, size: number, desc: number, avail: number, used: number): Promise<void> {
    const t = this.regs;
    if (this.legacy) {
      // Legacy rings: the device's size, descriptors on a page, the used ring on the next 4 KiB.
      const L = PCI_SPACE.legacy;
      await w(t, L + 4, 4, Number(features & 0xffff_ffffn));
      await w(t, L + 14, 2, 0);
      if (size !== r(t, L + 12, 2) || desc % 4096 || avail !== desc + 16 * size) {
        throw new Failure("legacy rings must be laid out by the device's rules");
      }
      await w(t, L + 8, 4, desc / 4096);
      return;
    }
    for (const sel of [0, 1]) {
      await w(t, 0x08, 4, sel);
      await w(t, 0x0c, 4, Number((features >> BigInt(32 * sel)) & 0xffff_ffffn));
    }
    await this.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
    await w(t, 0x16, 2, 0);
    await w(t, 0x18, 2, size);
    await w(t, 0x20, 8, desc);
    await w(t, 0x28, 8, avail);
    await w(t, 0x30, 8, used);
    await w(t, 0x1c, 2, 1);
  }
  notify(index: number): void | Promise<void> {
    const d = new Uint8Array([index & 0xff, (index >> 8) & 0xff]);
    if (this.legacy) return this.regs.write(PCI_SPACE.legacy + 16, d);
    return this.t.barWrite(VirtioPci.notifyOffset(index & 0xffff), d);
  }
}

/** One episode: a target device on a transport, a bystander, a driver and a model. */
class Episode {
  readonly p: Prng;
  target!: Port;
  device!: VirtioDevice;
  blk: VirtioBlk | undefined;
  backend: WatchedBackend | undefined;
  bystander!: MmioRegisterFile;
  q!: Queue;
  bq!: Queue;
  features = 0n;
  inflight = new Map<number, Expect>();
  hostileHeads = new Set<number>();
  /** [start, end) RAM offsets the device may write now besides rings and the hostile zone. */
  validCursor: number = VALID_ZONE[0];
  tainted = false;
  /** A request that may change the image was made available since the image was last compared. */
  imageDirty = true;
  readonly log: string[] = [];

  constructor(
    readonly run: Run,
    readonly episode: number,
    readonly deviceKind: string,
    readonly transport: string,
  ) {
    this.p = new Prng(episodeSeed(run.opts.seed, episode));
  }

  get name(): string {
    return `${this.deviceKind}/${this.transport}`;
  }

  note(s: string): void {
    if (this.run.opts.verbose) console.log(`  [${this.episode}] ${s}`);
    this.log.push(s);
    if (this.log.length > 40) this.log.shift();
  }

  fail(msg: string): never {
    throw new Failure(msg);
  }

  // --- memory helpers (the driver's writes also go to `expected`) ---
  off(gpa: number): number {
    return gpa - BASE;
  }
  put(gpa: number, bytes: Uint8Array): void {
    this.run.ram.set(bytes, this.off(gpa));
    this.run.expected.set(bytes, this.off(gpa));
  }
  put16(gpa: number, v: number): void {
    this.put(gpa, new Uint8Array([v & 0xff, (v >> 8) & 0xff]));
  }
  get16(gpa: number): number {
    const o = this.off(gpa);
    return this.run.ram[o] | (this.run.ram[o + 1] << 8);
  }
  get32(gpa: number): number {
    const o = this.off(gpa);
    return new DataView(this.run.buffer, GUARD + o, 4).getUint32(0, true);
  }
  setDesc(table: number, i: number, addr: number, len: number, flags: number, next: number): void {
    const b = new Uint8Array(16);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, BigInt(addr), true);
    dv.setUint32(8, len >>> 0, true);
    dv.setUint16(12, flags, true);
    dv.setUint16(14, next & 0xffff, true);
    this.put(table + 16 * i, b);
  }
  allocValid(len: number, align = 16): number | undefined {
    const a = Math.ceil(this.validCursor / align) * align;
    if (a + len > VALID_ZONE[1]) return undefined;
    this.validCursor = a + len;
    return BASE + a;
  }
  hostileAddr(len: number): number {
    const span = HOSTILE_ZONE[1] - HOSTILE_ZONE[0];
    const l = Math.min(len, span);
    return BASE + HOSTILE_ZONE[0] + this.p.int(span - l + 1);
  }

  // --- setup ---
  makeDevice(kind: string, bystander: boolean): VirtioDevice {
    if (kind === "rng" || bystander) {
      return new VirtioRng({ fill: (b) => b.fill(RNG_FILL) }, { maxRequestBytes: 4096 });
    }
    this.backend = new WatchedBackend(this.run.file, this.run.report);
    const serial = `fuzz-${this.episode % 1000}`;
    this.blk = this.run.opts.makeBlk?.(this.backend, serial) ?? new VirtioBlk(this.backend, { serial });
    return this.blk;
  }
  /** A virtio-MMIO transport whose InterruptStatus cell is a word of a page of its own (MmioPort). */
  makeTransport(dev: VirtioDevice, kind: string): MmioRegisterFile {
    const irq = { trigger: () => {} };
    const isr = { array: new Int32Array(new SharedArrayBuffer(0x1000)), index: 0x060 / 4 };
    return kind === "mmio"
      ? new VirtioMmio(dev, this.run.mem, irq, isr)
      : new VirtioMmioLegacy(dev, this.run.mem, irq, isr);
  }

  makePort(dev: VirtioDevice, kind: string): Port {
    if (kind.startsWith("pci")) {
      const msi = { update: () => {}, signal: () => {} };
      const flavor = kind === "pci" ? "modern" : kind === "pci-legacy" ? "legacy" : "transitional";
      const t = new VirtioPci(dev, this.run.mem, { intx: { trigger: () => {} }, msi, flavor });
      // A transitional function meets a modern driver or a legacy one, as the episode decides.
      const legacy = flavor === "legacy" || (flavor === "transitional" && this.p.chance(0.5));
      return new PciPort(t, legacy);
    }
    return new MmioPort(this.makeTransport(dev, kind), kind === "mmio", this.run.opts.keepCopy);
  }

  /** The driver's bring-up: reset, features, one queue at `ring`, DRIVER_OK. */
  async bringUp(port: Port, ring: number, size: number, features: bigint): Promise<Queue> {
    await port.setStatus(0);
    await port.setStatus(STATUS.ACKNOWLEDGE);
    await port.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    const desc = BASE + ring, avail = desc + 16 * size;
    const used = Math.ceil((avail + 6 + 2 * size) / 4096) * 4096;
    // The rings start empty.
    this.put(desc, new Uint8Array(used + 6 + 8 * size - desc));
    await port.configure(features, size, desc, avail, used);
    await port.setStatus(port.status() | STATUS.DRIVER_OK);
    const st = port.status();
    if (!(st & STATUS.DRIVER_OK) || (st & STATUS.DEVICE_NEEDS_RESET)) {
      this.fail(`bring-up failed: status 0x${st.toString(16)}`);
    }
    return {
      size,
      desc,
      avail,
      used,
      availIdx: 0,
      lastUsed: 0,
      free: Array.from({ length: size }, (_, i) => i),
    };
  }

  async setupTarget(): Promise<void> {
    const t = this.target;
    const legacyPci = t instanceof PciPort && t.legacy;
    const offered = t.deviceFeatures();
    // A random subset of what is offered (VERSION_1 always, on modern).
    let f = 0n;
    for (let b = 0n; b < 64n; b++) if ((offered >> b) & 1n && this.p.chance(0.7)) f |= 1n << b;
    if (this.transport !== "mmio-legacy" && !legacyPci) f |= 1n << 32n;
    this.features = f;
    const size = legacyPci ? 256 : this.p.pick([2, 4, 8, 16, 32, 64, 128, 256]);
    this.q = await this.bringUp(t, RING_TARGET, size, f);
    this.inflight.clear();
    this.hostileHeads.clear();
    this.validCursor = VALID_ZONE[0];
    this.tainted = false;
    this.note(`target up: queue ${size}, features 0x${f.toString(16)}`);
  }

  get indirect(): boolean {
    return (this.features & (1n << 28n)) !== 0n;
  }
  get flushNegotiated(): boolean {
    return (this.features & (1n << 9n)) !== 0n;
  }

  // --- publishing ---
  publish(q: Queue, head: number): void {
    this.put16(q.avail + 4 + 2 * (q.availIdx % q.size), head);
    q.availIdx = (q.availIdx + 1) & 0xffff;
    this.put16(q.avail + 2, q.availIdx);
    this.run.report.chains++;
  }

  /** Lays out `bufs` as a chain (direct or through an indirect table); returns head and slots. */
  chain(
    bufs: Array<[number, number, boolean]>,
    indirect: boolean,
  ): { head: number; slots: number[] } | undefined {
    const q = this.q;
    if (indirect) {
      if (q.free.length < 1) return undefined;
      const table = this.allocValid(16 * bufs.length, 16);
      if (table === undefined) return undefined;
      bufs.forEach(([a, l, w], i) =>
        this.setDesc(
          table,
          i,
          a,
          l,
          (w ? VIRTQ_DESC_F_WRITE : 0) | (i < bufs.length - 1 ? VIRTQ_DESC_F_NEXT : 0),
          i + 1,
        )
      );
      const head = q.free.shift()!;
      this.setDesc(q.desc, head, table, 16 * bufs.length, VIRTQ_DESC_F_INDIRECT, 0);
      return { head, slots: [head] };
    }
    if (q.free.length < bufs.length) return undefined;
    const slots = q.free.splice(0, bufs.length);
    bufs.forEach(([a, l, w], i) =>
      this.setDesc(
        q.desc,
        slots[i],
        a,
        l,
        (w ? VIRTQ_DESC_F_WRITE : 0) | (i < bufs.length - 1 ? VIRTQ_DESC_F_NEXT : 0),
        slots[i + 1] ?? 0,
      )
    );
    return { head: slots[0], slots };
  }

  /** Splits `len` bytes at `gpa` into 1-3 buffers. */
  split(gpa: number, len: number, write: boolean): Array<[number, number, boolean]> {
    const n = len < 2 ? 1 : 1 + this.p.int(3);
    const out: Array<[number, number, boolean]> = [];
    let at = 0;
    for (let i = 0; i < n; i++) {
      const take = i === n - 1 ? len - at : this.p.int(len - at + 1);
      if (take === 0 && i !== n - 1) continue;
      out.push([gpa + at, take, write]);
      at += take;
    }
    return out;
  }

  randomBytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    // Bytes >= 0x80 only: no run of them reads as a write request's type.
    for (let i = 0; i < n; i++) b[i] = 0x80 | (this.p.u32() & 0x7f);
    return b;
  }

  overlaps(first: number, end: number, writes: boolean): boolean {
    for (const e of this.inflight.values()) {
      if (!e.range) continue;
      const [a, b, w] = e.range;
      if (first < b && a < end && (w || writes)) return true;
    }
    return false;
  }

  /** A well-formed request with a predicted outcome. */
  validRequest(): boolean {
    const useIndirect = this.indirect && this.p.chance(0.3);
    if (this.deviceKind === "rng") {
      const len = this.p.pick([1, 7, 64, 512, 4096, 5000]);
      const buf = this.allocValid(len);
      if (buf === undefined) return false;
      this.put(buf, new Uint8Array(len).fill(0xee));
      const parts = this.split(buf, len, true);
      const c = this.chain(parts, useIndirect);
      if (!c) return false;
      const n = Math.min(len, 4096);
      const after = new Uint8Array(len).fill(0xee);
      after.fill(RNG_FILL, 0, n);
      this.inflight.set(c.head, {
        head: c.head,
        slots: c.slots,
        len: n,
        writes: [[buf, after]],
        kind: `rng ${len}`,
      });
      this.publish(this.q, c.head);
      return true;
    }
    const p = this.p;
    const type = p.pick([
      BLK_T.IN,
      BLK_T.IN,
      BLK_T.OUT,
      BLK_T.OUT,
      BLK_T.FLUSH,
      BLK_T.GET_ID,
      BLK_T.DISCARD,
      BLK_T.WRITE_ZEROES,
      99,
    ]);
    const sectors = 1 + p.int(8);
    let sector = p.int(DISK_SECTORS - sectors + 1);
    const outOfRange = p.chance(0.05);
    if (outOfRange) sector = DISK_SECTORS - p.int(sectors);
    const hdr = this.allocValid(16);
    const st = this.allocValid(1);
    if (hdr === undefined || st === undefined) return false;
    const h = new Uint8Array(16);
    new DataView(h.buffer).setUint32(0, type, true);
    new DataView(h.buffer).setBigUint64(8, BigInt(sector), true);
    this.put(hdr, h);
    this.put(st, new Uint8Array([0xee]));
    const bufs: Array<[number, number, boolean]> = [[hdr, 16, false]];
    const e: Expect = {
      head: 0,
      slots: [],
      len: 1,
      writes: [],
      kind: `blk type ${type} sector ${sector}+${sectors}`,
    };
    const status = (s: number) => e.writes.push([st, new Uint8Array([s])]);
    const inRange = !outOfRange && sector + sectors <= DISK_SECTORS;
    const bytes = sectors * SECTOR;
    if (type === BLK_T.IN || type === BLK_T.GET_ID) {
      const len = type === BLK_T.IN ? bytes : p.pick([1, 19, 20, 21, 40]);
      if (type === BLK_T.IN && this.overlaps(sector, sector + sectors, false)) return false;
      const buf = this.allocValid(len, 512);
      if (buf === undefined) return false;
      this.put(buf, new Uint8Array(len).fill(0xee));
      bufs.push(...this.split(buf, len, true));
      if (type === BLK_T.IN) {
        e.range = [sector, sector + sectors, false];
        if (inRange) {
          e.writes.push([buf, this.run.shadow.slice(sector * SECTOR, sector * SECTOR + bytes)]);
          e.len = bytes + 1;
          status(BLK_S.OK);
        } else {
          e.len = 0;
          status(BLK_S.IOERR);
        }
      } else {
        const id = new TextEncoder().encode(`fuzz-${this.episode % 1000}`);
        const want = new Uint8Array(len).fill(0xee);
        const idBytes = new Uint8Array(20);
        idBytes.set(id);
        want.set(idBytes.subarray(0, Math.min(20, len)));
        e.writes.push([buf, want]);
        e.len = len <= 20 ? len + 1 : 20;
        status(BLK_S.OK);
      }
    } else if (type === BLK_T.OUT) {
      if (this.overlaps(sector, sector + sectors, true)) return false;
      const buf = this.allocValid(bytes, 512);
      if (buf === undefined) return false;
      const data = this.randomBytes(bytes);
      this.put(buf, data);
      bufs.push(...this.split(buf, bytes, false));
      e.range = [sector, sector + sectors, true];
      if (inRange) {
        e.image = data;
        status(BLK_S.OK);
      } else status(BLK_S.IOERR);
    } else if (type === BLK_T.DISCARD || type === BLK_T.WRITE_ZEROES) {
      if (this.overlaps(sector, sector + sectors, true)) return false;
      const seg = this.allocValid(16);
      if (seg === undefined) return false;
      const s = new Uint8Array(16);
      const dv = new DataView(s.buffer);
      dv.setBigUint64(0, BigInt(sector), true);
      dv.setUint32(8, sectors, true);
      dv.setUint32(12, type === BLK_T.WRITE_ZEROES ? p.int(2) : 0, true);
      this.put(seg, s);
      bufs.push([seg, 16, false]);
      e.range = [sector, sector + sectors, true];
      if (inRange) {
        e.image = new Uint8Array(bytes);
        status(BLK_S.OK);
      } else status(BLK_S.IOERR);
    } else if (type === BLK_T.FLUSH) {
      status(BLK_S.OK);
    } else {
      status(BLK_S.UNSUPP);
    }
    bufs.push([st, 1, true]);
    const c = this.chain(bufs, useIndirect);
    if (!c) return false;
    if (e.range?.[2]) this.imageDirty = true;
    e.head = c.head;
    e.slots = c.slots;
    this.inflight.set(c.head, e);
    this.publish(this.q, c.head);
    return true;
  }

  /** A hostile chain: random descriptors pointing into the hostile zone or outside RAM. */
  hostileChain(): boolean {
    const q = this.q, p = this.p;
    if (q.free.length < 1) return false;
    const n = Math.min(q.free.length, 1 + p.int(4));
    const slots = q.free.splice(0, n);
    const randAddr = (len: number) =>
      p.chance(0.1)
        ? p.pick([BASE + RAM - 1, BASE - 16, 2 ** 52, 0, BASE + RAM + 4096])
        : this.hostileAddr(len);
    const randLen = () => p.pick([0, 1, 15, 16, 17, 512, 4096, 65536, 0x7fff_ffff, 0xffff_ffff, p.int(8192)]);
    const randNext = (i: number) =>
      p.chance(0.7) ? slots[(i + 1) % n] : p.chance(0.5) ? slots[p.int(n)] : q.size + p.int(65536 - q.size);
    const style = p.int(5);
    for (let i = 0; i < n; i++) {
      let flags = p.int(8);
      let len = randLen();
      let addr = randAddr(len);
      if (style === 1 && i === n - 1 && this.indirect) {
        // An indirect table: hostile entries, or one far longer than the queue.
        flags = VIRTQ_DESC_F_INDIRECT | (p.chance(0.2) ? VIRTQ_DESC_F_NEXT : 0);
        const entries = p.chance(0.2) ? q.size + 1 + p.int(1 << 20) : 1 + p.int(Math.min(8, q.size));
        len = p.chance(0.1) ? 16 * entries + p.int(16) : 16 * entries;
        addr = this.hostileAddr(16 * Math.min(entries, 64));
        for (let j = 0; j < Math.min(entries, 64); j++) {
          const inner = p.int(8);
          const il = randLen();
          this.setDesc(addr, j, randAddr(il), il, inner, p.chance(0.8) ? j + 1 : p.int(70000));
        }
      } else if (style === 2) {
        // A blk-shaped chain whose header is in the hostile zone: type never a write.
        const hdr = this.hostileAddr(16);
        const h = new Uint8Array(16);
        const dv = new DataView(h.buffer);
        dv.setUint32(0, p.pick([BLK_T.IN, BLK_T.GET_ID, BLK_T.FLUSH, 0x80808080, 7]), true);
        dv.setBigUint64(8, BigInt(p.chance(0.5) ? p.int(DISK_SECTORS) : p.u32() * 2 ** 20), true);
        this.put(hdr, h);
        if (i === 0) {
          addr = hdr;
          len = 16;
          flags = n > 1 ? VIRTQ_DESC_F_NEXT : 0;
        } else {
          flags = VIRTQ_DESC_F_WRITE | (i < n - 1 ? VIRTQ_DESC_F_NEXT : 0);
          len = p.pick([1, 512, 1024, 4097, 1 << 20, 2 << 20]);
          addr = this.hostileAddr(len);
        }
      }
      this.setDesc(q.desc, slots[i], addr, len, flags, style === 2 ? slots[i + 1] ?? 0 : randNext(i));
    }
    this.hostileHeads.add(slots[0]);
    this.run.report.hostileChains++;
    this.note(`hostile chain style ${style} head ${slots[0]} (${n} slots)`);
    this.publish(q, slots[0]);
    return true;
  }

  /** Ring index mutations: an avail index that jumps too far, a head beyond the queue. */
  ringMutation(): void {
    const q = this.q, p = this.p;
    if (p.chance(0.5)) {
      const jump = q.size + 1 + p.int(65535 - q.size);
      this.note(`avail.idx jumps by ${jump}`);
      this.put16(q.avail + 2, (q.availIdx + jump) & 0xffff);
      q.availIdx = (q.availIdx + jump) & 0xffff;
    } else {
      const head = q.size + p.int(65536 - q.size);
      this.note(`avail ring entry ${head}`);
      this.put16(q.avail + 4 + 2 * (q.availIdx % q.size), head);
      q.availIdx = (q.availIdx + 1) & 0xffff;
      this.put16(q.avail + 2, q.availIdx);
    }
    this.tainted = true; // the device must ask for a reset; nothing more is predicted
    this.run.report.chains++;
    this.run.report.hostileChains++;
  }

  notify(index: number): void {
    const d = new Uint8Array(4);
    new DataView(d.buffer).setUint32(0, index >>> 0, true);
    if (this.target.notify(index) instanceof Promise) this.fail("a notify returned a promise");
  }

  /** Takes used entries and checks each against the model. */
  takeUsed(): void {
    const q = this.q;
    const idx = this.get16(q.used + 2);
    const n = (idx - q.lastUsed) & 0xffff;
    if (n > q.size && !this.tainted) this.fail(`used.idx moved by ${n}, more than the queue size`);
    while (q.lastUsed !== idx) {
      const slot = q.used + 4 + 8 * (q.lastUsed % q.size);
      const id = this.get32(slot), len = this.get32(slot + 4);
      q.lastUsed = (q.lastUsed + 1) & 0xffff;
      const e = this.inflight.get(id);
      if (e) {
        this.inflight.delete(id);
        this.checkCompleted(e, len);
        q.free.push(...e.slots);
      } else if (this.hostileHeads.has(id)) {
        this.hostileHeads.delete(id);
      } else if (!this.tainted) {
        this.fail(`used entry names head ${id}, which is not available`);
      }
    }
    // The used ring (and avail_event) are the device's to write.
    this.syncExpected(q.used, 6 + 8 * q.size);
  }

  syncExpected(gpa: number, len: number): void {
    const o = this.off(gpa);
    this.run.expected.set(this.run.ram.subarray(o, o + len), o);
  }

  checkCompleted(e: Expect, len: number): void {
    if (len !== e.len) this.fail(`${e.kind}: used.len ${len}, expected ${e.len}`);
    for (const [gpa, want] of e.writes) {
      const got = this.run.mem.view(gpa, want.length);
      for (let i = 0; i < want.length; i++) {
        if (got[i] !== want[i]) {
          this.fail(
            `${e.kind}: byte ${i} at 0x${gpa.toString(16)} is 0x${got[i].toString(16)}, expected 0x${
              want[i].toString(16)
            }`,
          );
        }
      }
      this.syncExpected(gpa, want.length);
    }
    const ok = e.writes.length > 0 && e.writes[e.writes.length - 1][1][0] === BLK_S.OK;
    if (e.range && e.image && ok) {
      this.run.shadow.set(e.image, e.range[0] * SECTOR);
      if (!this.flushNegotiated && this.backend!.unsynced.has(e.range[0] * SECTOR)) {
        this.fail(`${e.kind}: completed without FLUSH negotiated, but not synced`);
      }
    }
  }

  /** Lets in-flight disk I/O finish and completions run. */
  async settle(): Promise<void> {
    const deadline = performance.now() + 10_000;
    while ((this.blk?.pending ?? 0) > 0 && performance.now() < deadline) {
      const running = this.backend ? [...this.backend.running] : [];
      if (running.length) {
        await Promise.allSettled(running);
        continue;
      }
      // The disk calls are done; their completions are a few promise steps behind.
      for (let i = 0; i < 500 && (this.blk?.pending ?? 0) > 0; i++) await null;
      if ((this.blk?.pending ?? 0) > 0 && !this.backend?.running.size) {
        await new Promise((r) => setTimeout(r, 0));
      }
    }
    // What the device changed on its own (NEEDS_RESET after a hostile chain, a reset that
    // completed) must be in the register page before the driver's next read.
    const mismatch = this.target.pageMismatch?.();
    if (mismatch) this.fail(`${mismatch} once the device settled`);
  }

  /** Compares RAM with what it must hold, except the zones the device may write. */
  checkRam(strict: boolean, what: string): void {
    const { ram, expected, all } = this.run;
    for (let i = 0; i < GUARD; i++) {
      if (all[i] !== GUARD_BYTE || all[GUARD + RAM + i] !== GUARD_BYTE) {
        this.fail(`${what}: a guard byte around RAM changed`);
      }
    }
    const skip: Array<[number, number]> = strict || this.tainted ? [] : [
      [this.off(this.q.used), this.off(this.q.used) + 6 + 8 * this.q.size],
      [this.off(this.bq.used), this.off(this.bq.used) + 6 + 8 * this.bq.size],
      [HOSTILE_ZONE[0], HOSTILE_ZONE[1]],
      ...[...this.inflight.values()].flatMap((e) =>
        e.writes.map(([g, w]) => [this.off(g), this.off(g) + w.length] as [number, number])
      ),
    ];
    if (this.tainted && !strict) return; // a hostile register or ring told the device to write anywhere
    skip.sort((x, y) => x[0] - y[0]);
    const a = this.run.ram32, b = this.run.expected32;
    for (let w = 0; w < a.length; w++) {
      if (a[w] === b[w]) continue;
      for (let i = 4 * w; i < 4 * w + 4; i++) {
        if (ram[i] === expected[i]) continue;
        const region = skip.find(([x, y]) => i >= x && i < y);
        if (region) {
          w = Math.max(w, (region[1] >> 2) - 1); // the rest of the region may change too
          break;
        }
        this.fail(
          `${what}: RAM byte at 0x${(BASE + i).toString(16)} changed to 0x${
            ram[i].toString(16)
          } (expected 0x${expected[i].toString(16)})`,
        );
      }
    }
    // What the device may write and did, is what RAM holds from now on.
    if (!strict) {
      this.syncExpected(BASE + HOSTILE_ZONE[0], HOSTILE_ZONE[1] - HOSTILE_ZONE[0]);
      this.syncExpected(this.q.used, 6 + 8 * this.q.size);
      this.syncExpected(this.bq.used, 6 + 8 * this.bq.size);
    }
  }

  /** Resets the target as a driver does and checks that nothing moves afterwards. */
  async reset(why: string): Promise<void> {
    const inFlight = (this.blk?.pending ?? 0) > 0;
    if (inFlight) this.run.report.resetsInFlight++;
    this.note(`reset (${why})${inFlight ? " with I/O in flight" : ""}`);
    await this.target.setStatus(0);
    const st = this.target.status();
    if (st !== 0) this.fail(`Status reads 0x${st.toString(16)} after the reset was answered`);
    if ((this.blk?.pending ?? 0) > 0) this.fail("requests still in flight after the reset was answered");
    this.checkRam(false, `at a reset (${why})`);
    // Requests dropped by the reset: their buffers may hold data; their writes may have landed.
    this.resolveDropped();
    this.run.expected.set(this.run.ram);
    const imageBefore = this.readImage();
    if (inFlight) this.run.gc?.();
    // Had a call outlived the reset, it would land now.
    if (inFlight) await new Promise((r) => setTimeout(r, 1));
    for (let i = 0; i < 10; i++) await null;
    this.checkRam(true, `after a reset (${why}) completed`);
    const imageAfter = this.readImage();
    if (!equal(imageBefore, imageAfter)) this.fail("the image changed after the reset completed");
    this.checkImage(imageAfter);
    this.imageDirty = false;
  }

  /** The image as it is on disk (positional reads on a file the run keeps open). */
  readImage(): Uint8Array {
    if (!this.blk) return new Uint8Array(0);
    if (!this.imageDirty && !this.tainted) return this.run.shadow;
    const out = new Uint8Array(DISK_SECTORS * SECTOR);
    const f = this.run.imageFile;
    f.seekSync(0, Deno.SeekMode.Start);
    for (let at = 0; at < out.length;) {
      const n = f.readSync(out.subarray(at));
      if (!n) break;
      at += n;
    }
    return out;
  }

  /** Writes that were in flight at a reset either landed whole or not at all. */
  resolveDropped(): void {
    if (!this.blk) {
      this.inflight.clear();
      return;
    }
    const img = this.readImage();
    for (const e of this.inflight.values()) {
      if (!e.range || !e.image) continue;
      const at = e.range[0] * SECTOR;
      const now = img.subarray(at, at + e.image.length);
      const old = this.run.shadow.subarray(at, at + e.image.length);
      if (equal(now, e.image)) this.run.shadow.set(e.image, at);
      else if (!equal(now, old)) {
        this.fail(`${e.kind}: dropped by a reset, left the image neither old nor new`);
      }
    }
    this.inflight.clear();
    this.hostileHeads.clear();
  }

  checkImage(img: Uint8Array): void {
    if (!this.blk) return;
    if (!equal(img, this.run.shadow)) {
      let i = 0;
      while (img[i] === this.run.shadow[i]) i++;
      this.fail(`the image differs from the model's shadow at byte ${i} (sector ${Math.floor(i / SECTOR)})`);
    }
  }

  /** The bystander serves a request at once. */
  bystanderServes(): void {
    const bq = this.bq;
    const buf = BASE + RING_BYSTANDER + 0x3000; // its own page after its rings
    this.put(buf, new Uint8Array(64).fill(0));
    const head = bq.availIdx % bq.size;
    this.setDesc(bq.desc, head, buf, 64, VIRTQ_DESC_F_WRITE, 0);
    this.publish(bq, head);
    const d = new Uint8Array(4);
    this.bystander.write(0x050, d);
    const idx = this.get16(bq.used + 2);
    if (idx !== bq.availIdx) this.fail("the bystander device stopped serving");
    if (!this.run.mem.view(buf, 64).every((b) => b === RNG_FILL)) {
      this.fail("the bystander's answer is wrong");
    }
    this.syncExpected(buf, 64);
    this.syncExpected(bq.used, 6 + 8 * bq.size);
  }

  /** Register accesses of any offset, width and value. */
  async registerStorm(): Promise<void> {
    const p = this.p;
    // Rings and data the device could be pointed at must not hold a write request.
    this.put(BASE + VALID_ZONE[0], new Uint8Array(VALID_ZONE[1] - VALID_ZONE[0]));
    this.put(BASE + RING_TARGET, new Uint8Array(RING_BYSTANDER - RING_TARGET));
    this.tainted = true;
    const n = 1 + p.int(24);
    for (let i = 0; i < n; i++) {
      const t = this.target;
      const off = p.chance(0.8)
        ? p.pick(t.stormOffsets) + (p.chance(0.1) ? p.int(4) : 0)
        : p.chance(0.8)
        ? p.int(t.stormSpan)
        : p.int(2 ** 32);
      const width = p.pick([1, 2, 4, 4, 4, 8]);
      const d = new Uint8Array(width);
      const value = p.pick([
        0,
        1,
        2,
        3,
        4,
        7,
        8,
        0xb,
        0xf,
        0x40,
        0x80,
        0xff,
        0x100,
        0xffff,
        0x10000,
        0xffff_ffff,
        p.u32(),
      ]);
      for (let i = 0; i < width; i++) d[i] = i < 4 ? (value >>> (8 * i)) & 0xff : p.int(256);
      this.run.report.registerAccesses++;
      if (p.chance(0.4)) {
        t.regs.read(off, d);
      } else {
        const r = t.regs.write(off, d);
        if (r instanceof Promise) await r;
      }
      const mismatch = t.pageMismatch?.();
      if (mismatch) this.fail(`${mismatch} after a ${width}-byte access at 0x${off.toString(16)}`);
    }
    this.note(`register storm of ${n}`);
  }

  async runOne(): Promise<void> {
    const { run, p } = this;
    run.ram.fill(0);
    for (let i = 0; i < GUARD; i++) run.all[i] = run.all[GUARD + RAM + i] = GUARD_BYTE;
    // The hostile zone holds bytes >= 0x80 (see randomBytes).
    run.ram.set(this.randomBytes(HOSTILE_ZONE[1] - HOSTILE_ZONE[0]), HOSTILE_ZONE[0]);
    run.expected.set(run.ram);
    this.device = this.makeDevice(this.deviceKind, false);
    this.target = this.makePort(this.device, this.transport);
    this.bystander = this.makeTransport(this.makeDevice("rng", true), "mmio");
    this.bq = await this.bringUp(new MmioPort(this.bystander, true), RING_BYSTANDER, 8, 1n << 32n);
    await this.setupTarget();
    const steps = 8 + p.int(56);
    for (let s = 0; s < steps; s++) {
      if (run.opts.maxChains && run.report.chains >= run.opts.maxChains) break;
      const r = p.int(100);
      if (r < 45) {
        const k = 1 + p.int(4);
        for (let i = 0; i < k; i++) if (!this.validRequest()) break;
        this.notify(0);
      } else if (r < 60) {
        this.hostileChain();
        if (p.chance(0.5)) this.validRequest();
        this.notify(0);
      } else if (r < 64) {
        this.ringMutation();
        this.notify(0);
      } else if (r < 70) {
        this.notify(p.pick([1, 2, 0xffff, 0x10000, 0x10001, p.u32()]));
      } else if (r < 80) {
        await this.settle();
      } else if (r < 86) {
        // A reset right after new requests: with disk I/O in flight, for blk.
        this.validRequest();
        this.notify(0);
        await this.reset("in flight");
        await this.setupTarget();
      } else if (r < 90) {
        await this.settle();
        this.takeUsed();
        await this.reset("before a register storm");
        await this.registerStorm();
        await this.settle();
        await this.reset("after a register storm");
        this.checkRam(false, "after a register storm");
        await this.setupTarget();
      } else if (r < 95) {
        this.bystanderServes();
      } else if (run.gc) {
        const junk: Uint8Array[] = [];
        for (let i = 0; i < 200; i++) junk.push(new Uint8Array(64 + p.int(4096)).fill(0x41));
        run.gc();
      }
      if (p.chance(0.3)) await this.settle();
      this.takeUsed();
      const st = this.target.status();
      if (st & STATUS.DEVICE_NEEDS_RESET) {
        run.report.needsReset++;
        await this.settle();
        this.takeUsed();
        await this.reset("NEEDS_RESET");
        await this.setupTarget();
      } else if (!this.tainted) {
        if (run.opts.verbose || p.chance(0.25)) this.checkRam(false, `step ${s}`);
      } else if (this.tainted) {
        await this.settle();
        this.takeUsed();
        await this.reset("tainted ring");
        await this.setupTarget();
      }
    }
    await this.settle();
    this.takeUsed();
    if (
      !this.tainted && this.inflight.size > 0 && !(this.target.status() & STATUS.DEVICE_NEEDS_RESET)
    ) {
      // Everything well-formed was answered (nothing in flight, no reset requested).
      const left = [...this.inflight.values()].map((e) => e.kind).join(", ");
      if ((this.blk?.pending ?? 0) === 0) this.fail(`requests never answered: ${left}`);
    }
    this.bystanderServes();
    this.imageDirty = true; // compare the whole image at least once an episode
    await this.reset("end of episode");
  }
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Runs episodes; resolves with what happened. Never throws for a device misbehaving. */
export async function runFuzz(opts: FuzzOptions): Promise<FuzzReport> {
  const t0 = performance.now();
  const image = await Deno.makeTempFile({ prefix: "tsvmm-fuzz-", suffix: ".img" });
  const init = new Uint8Array(DISK_SECTORS * SECTOR);
  const ip = new Prng(opts.seed);
  for (let i = 0; i < init.length; i++) init[i] = 0x80 | (ip.u32() & 0x7f);
  await Deno.writeFile(image, init);
  // Under GC pressure every transfer takes the blocking pool, whose buffers must stay pinned;
  // otherwise reads the page cache holds are served at once (RWF_NOWAIT), as in the VMM.
  const file = FileBackend.open(image, false, { nowait: !opts.gcPressure });
  const run = new Run(opts, image, file);
  run.shadow = init.slice();
  const transports = FUZZ_TRANSPORTS.filter((t) => !opts.transports || opts.transports.includes(t));
  const devices = FUZZ_DEVICES.filter((d) => !opts.devices || opts.devices.includes(d));
  const first = opts.firstEpisode ?? 0;
  const rss0 = Deno.memoryUsage().rss;
  try {
    for (let ep = first; ep < first + opts.episodes; ep++) {
      if (opts.maxChains && run.report.chains >= opts.maxChains) break;
      if (opts.maxMs && performance.now() - t0 > opts.maxMs) break;
      const pick = new Prng(episodeSeed(opts.seed, ep) ^ 0x5bd1e995);
      const e = new Episode(run, ep, pick.pick(devices), pick.pick(transports));
      run.report.episodes++;
      try {
        await e.runOne();
      } catch (err) {
        const message = err instanceof Failure
          ? err.message
          : `uncaught ${(err as Error).name}: ${(err as Error).message}\n${(err as Error).stack ?? ""}`;
        run.report.failures.push({
          seed: opts.seed,
          episode: ep,
          target: e.name,
          message: `${message}\n  last actions: ${e.log.slice(-8).join(" | ")}`,
        });
        if (opts.stopOnFailure ?? true) break;
        // Start the next episode from an image the model knows.
        await Deno.writeFile(image, run.shadow);
      }
      const rss = Deno.memoryUsage().rss;
      run.report.maxRss = Math.max(run.report.maxRss, rss);
      if (rss - rss0 > 1024 * 1024 * 1024) {
        run.report.failures.push({
          seed: opts.seed,
          episode: ep,
          target: e.name,
          message: `RSS grew by ${rss - rss0} bytes`,
        });
        break;
      }
    }
  } finally {
    run.imageFile.close();
    await file.close();
    await Deno.remove(image);
  }
  run.report.ms = Math.round(performance.now() - t0);
  return run.report;
}
