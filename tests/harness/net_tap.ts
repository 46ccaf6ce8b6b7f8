/**
 * virtio-net against a real TAP, driven from the driver side in plain memory. Runs in a
 * network namespace of its own (tests/devices/net_tap_test.ts starts it under
 * `unshare -n`; it refuses to run anywhere else), so the TAP and its peer, the kernel's
 * own IP stack at 169.254.77.1, see nothing but each other. The "guest" is 169.254.77.2.
 *
 * Usage: unshare -n deno run -A tests/harness/net_tap.ts SCENARIO
 * Exits 0 when the scenario's checks pass; prints what failed otherwise.
 */

import assert from "node:assert/strict";
import dgram from "node:dgram";
import { DriverQueue, GuestRam, MmioDriver } from "./virtio_driver.ts";
import { VirtioMmio } from "../../transports/mmio.ts";
import { NET_F, type NetBackend, type NetOffloads, VirtioNet } from "../../devices/virtio/net.ts";
import { VirtioRng } from "../../devices/virtio/rng.ts";
import { Tap } from "../../vmm/tap.ts";
import { EventLoop } from "../../vmm/event_loop.ts";
import { libc, mmapAnonymous, sysClose, sysEventfd, sysMunmap, sysOpen } from "../../vmm/sys/libc.ts";
import { DEVICE_THREAD_NICE, DeviceThread } from "../../vmm/device_thread.ts";
import { privateCell, type SharedCell } from "../../vmm/shared_regs.ts";
import type { VirtioDevice } from "../../devices/virtio/device.ts";
import { Prng } from "../fuzz/fuzzer.ts";

const TAP = "tsvmm-h0";
const HOST_IP = "169.254.77.1";
const GUEST_IP = "169.254.77.2";
const GUEST_MAC = new Uint8Array([0x52, 0x54, 0x00, 0x77, 0x00, 0x02]);
const PORT = 9000;

const bitOf = (b: bigint) => 1n << b;
const VERSION_1 = 1n << 32n;
const EVENT_IDX = 1n << 29n;
const INDIRECT = 1n << 28n;

async function sh(cmd: string): Promise<string> {
  const out = await new Deno.Command("sh", { args: ["-c", cmd], stdout: "piped", stderr: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${cmd}: ${text}`);
  return text;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/**
 * Wraps the real TAP, refusing the next `n` writes with EAGAIN (fault injection); with `deaf`
 * set it never tells the device that a frame is waiting, so only the device's own reads get
 * frames in.
 */
class EagainTap implements NetBackend {
  refuse = 0;
  deaf = false;
  constructor(readonly tap: Tap) {}
  readFrame(b: Uint8Array[]): number {
    return this.tap.readFrame(b);
  }
  writeFrame(b: Uint8Array[]): number {
    if (this.refuse > 0) {
      this.refuse--;
      return -11;
    }
    return this.tap.writeFrame(b);
  }
  setHeaderSize(n: number): void {
    this.tap.setHeaderSize(n);
  }
  setOffloads(o: NetOffloads): void {
    this.tap.setOffloads(o);
  }
  onReadable(fn: (() => void) | undefined): void {
    this.tap.onReadable(this.deaf ? undefined : fn);
  }
  onWritable(fn: (() => void) | undefined): void {
    this.tap.onWritable(fn);
  }
}

/** The driver's side of a net device: what the frame helpers below need. */
interface Guest {
  ram: GuestRam;
  drv: MmioDriver;
  rx: DriverQueue;
  tx: DriverQueue;
  hdr: number;
  hostMac: Uint8Array;
}

interface Rig extends Guest {
  dev: VirtioNet;
  tap: Tap;
  backend: EagainTap;
  loop: EventLoop;
  close(): Promise<void>;
}

/**
 * The driver of `dev` behind virtio-MMIO over `ram` (with `isr` as its ISR cell, if given):
 * `features` negotiated, both queues set up (256 entries), DRIVER_OK.
 */
function netDriver(dev: VirtioDevice, ram: GuestRam, features: bigint, isr?: SharedCell) {
  const drv = new MmioDriver(new VirtioMmio(dev, ram.mem, { trigger() {} }, isr));
  assert.ok(drv.negotiate(features), "FEATURES_OK accepted");
  const rx = new DriverQueue(ram, 256);
  const tx = new DriverQueue(ram, 256);
  drv.setupQueue(0, rx);
  drv.setupQueue(1, tx);
  drv.driverOk();
  return { drv, rx, tx, hdr: (features & (VERSION_1 | bitOf(NET_F.MRG_RXBUF))) ? 12 : 10 };
}

/** The host's side of the TAP: its address, the guest as a permanent neighbour; its MAC. */
async function hostSide(): Promise<Uint8Array> {
  await sh(
    `ip addr add ${HOST_IP}/24 dev ${TAP} && ip link set ${TAP} up && ` +
      `ip neigh replace ${GUEST_IP} lladdr 52:54:00:77:00:02 dev ${TAP} nud permanent`,
  );
  // (sysfs shows the namespace it was mounted in, so ask ip.)
  const ether = /link\/ether ([0-9a-f:]{17})/.exec(await sh(`ip link show dev ${TAP}`))![1];
  return new Uint8Array(ether.split(":").map((x) => parseInt(x, 16)));
}

async function rig(
  features: bigint,
  opts: { mtu?: number; fd?: number; ram?: GuestRam } = {},
): Promise<Rig> {
  const tap = Tap.open(opts.fd !== undefined ? { fd: opts.fd } : { name: TAP });
  const loop = new EventLoop();
  tap.attach(loop);
  const backend = new EagainTap(tap);
  const ram = opts.ram ?? new GuestRam(8 << 20);
  const dev = new VirtioNet(backend, { mac: GUEST_MAC, mtu: opts.mtu });
  const { drv, rx, tx, hdr } = netDriver(dev, ram, features);
  loop.start();
  const hostMac = await hostSide();
  return {
    ram,
    dev,
    drv,
    rx,
    tx,
    tap,
    backend,
    loop,
    hdr,
    hostMac,
    close: async () => {
      await drv.w32(0x070, 0);
      tap.close();
      await loop.stop();
    },
  };
}

function ipChecksum(b: Uint8Array): number {
  let s = 0;
  for (let i = 0; i < b.length; i += 2) s += (b[i] << 8) | (b[i + 1] ?? 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return s;
}

/** An Ethernet + IPv4 + UDP frame from the guest to the host, with its virtio-net header. */
/**
 * A frame from the guest to the host with its virtio-net header: Ethernet, then an IPv4 header
 * for protocol `proto` with `body` bytes after it (left zero). Returns the frame, a view of it
 * and the IP header's offset.
 */
function ipv4Frame(r: Guest, proto: number, body: number): { f: Uint8Array; dv: DataView; ip: number } {
  const f = new Uint8Array(r.hdr + 14 + 20 + body);
  const dv = new DataView(f.buffer);
  const e = r.hdr;
  f.set(r.hostMac, e);
  f.set(GUEST_MAC, e + 6);
  dv.setUint16(e + 12, 0x0800);
  const ip = e + 14;
  f[ip] = 0x45;
  dv.setUint16(ip + 2, 20 + body);
  f[ip + 8] = 64;
  f[ip + 9] = proto;
  f.set([169, 254, 77, 2], ip + 12);
  f.set([169, 254, 77, 1], ip + 16);
  dv.setUint16(ip + 10, ~ipChecksum(f.subarray(ip, ip + 20)) & 0xffff);
  return { f, dv, ip };
}

function udpFrame(r: Guest, payload: Uint8Array, opts: { offloadCsum?: boolean } = {}): Uint8Array {
  const { f, dv, ip } = ipv4Frame(r, 17, 8 + payload.length);
  const udp = ip + 20;
  dv.setUint16(udp, 40000);
  dv.setUint16(udp + 2, PORT);
  dv.setUint16(udp + 4, 8 + payload.length);
  f.set(payload, udp + 8);
  if (opts.offloadCsum) {
    // VIRTIO_NET_HDR_F_NEEDS_CSUM: the host finishes the UDP checksum from the pseudo-header sum.
    f[0] = 1;
    dv.setUint16(6, 14 + 20, true); // csum_start
    dv.setUint16(8, 6, true); // csum_offset
    const pseudo = new Uint8Array(12);
    pseudo.set(f.subarray(ip + 12, ip + 20));
    pseudo[9] = 17;
    new DataView(pseudo.buffer).setUint16(10, 8 + payload.length);
    dv.setUint16(udp + 6, ipChecksum(pseudo));
  }
  return f;
}

/** An Ethernet + IPv4 + ICMP echo request from the guest to the host, with its virtio-net header. */
function echoFrame(r: Guest, id: number, seq: number): Uint8Array {
  const { f, dv, ip } = ipv4Frame(r, 1, 8);
  const icmp = ip + 20;
  f[icmp] = 8; // echo request
  dv.setUint16(icmp + 4, id);
  dv.setUint16(icmp + 6, seq);
  dv.setUint16(icmp + 2, ~ipChecksum(f.subarray(icmp, icmp + 8)) & 0xffff);
  return f;
}

/** Posts `n` receive chains of `size` bytes (optionally `parts` descriptors each). */
function postRx(r: Guest, n: number, size: number, parts = 1): number[] {
  const addrs: number[] = [];
  for (let i = 0; i < n; i++) {
    const a = r.ram.alloc(size, 16);
    addrs.push(a);
    const part = size / parts;
    r.rx.add(Array.from({ length: parts }, (_, k) => ({ addr: a + k * part, len: part, write: true })));
  }
  r.drv.notify(0);
  return addrs;
}

function sendTx(r: Guest, frame: Uint8Array, split = 1): number {
  const a = r.ram.alloc(frame.length, 16);
  r.ram.view(a, frame.length).set(frame);
  const part = Math.ceil(frame.length / split);
  const bufs = [];
  for (let o = 0; o < frame.length; o += part) {
    bufs.push({ addr: a + o, len: Math.min(part, frame.length - o) });
  }
  const head = r.tx.add(bufs);
  r.drv.notify(1);
  return head;
}

async function hostSocket(): Promise<{ got: Uint8Array[]; sock: dgram.Socket }> {
  const sock = dgram.createSocket("udp4");
  const got: Uint8Array[] = [];
  sock.on("message", (m) => got.push(new Uint8Array(m)));
  await new Promise<void>((res) => sock.bind(PORT, HOST_IP, () => res()));
  return { got, sock };
}

function hostSend(sock: dgram.Socket, payload: Uint8Array): Promise<void> {
  return new Promise((res, rej) => sock.send(payload, PORT, GUEST_IP, (e) => e ? rej(e) : res()));
}

function payloadOf(len: number, seed: number): Uint8Array {
  return Uint8Array.from({ length: len }, (_, i) => (i * 31 + seed) & 0xff);
}

/** The frames the device put in the rx ring since the last call: [header, frame] each. */
function takeRx(r: Guest, addrs: Map<number, number>): Array<{ hdr: Uint8Array; frame: Uint8Array }> {
  const out: Array<{ hdr: Uint8Array; frame: Uint8Array }> = [];
  const used = r.rx.takeUsed();
  for (let i = 0; i < used.length;) {
    const first = r.ram.view(addrs.get(used[i][0])!, used[i][1]);
    const nbuf = r.hdr === 12 ? first[10] | (first[11] << 8) : 1;
    const parts: Uint8Array[] = [];
    for (let k = 0; k < nbuf; k++) {
      const [id, len] = used[i + k];
      parts.push(r.ram.view(addrs.get(id)!, len).slice());
    }
    i += nbuf;
    const all = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
    let o = 0;
    for (const p of parts) {
      all.set(p, o);
      o += p.length;
    }
    out.push({ hdr: all.subarray(0, r.hdr), frame: all.subarray(r.hdr) });
  }
  return out;
}

/** Waits until `n` frames have arrived in the rx ring (posted as `heads` says); returns them. */
async function receiveFrames(
  r: Guest,
  heads: Map<number, number>,
  n: number,
  what: string,
): Promise<Array<{ hdr: Uint8Array; frame: Uint8Array }>> {
  const frames: Array<{ hdr: Uint8Array; frame: Uint8Array }> = [];
  await until(what, () => {
    frames.push(...takeRx(r, heads));
    return frames.length >= n;
  });
  return frames;
}

/** Head index -> buffer address of the chains posted by `postRx` (one descriptor per part). */
function headMap(r: Guest, addrs: number[], parts: number, firstHead: number): Map<number, number> {
  const m = new Map<number, number>();
  addrs.forEach((a, i) => m.set((firstHead + i * parts) % r.rx.size, a));
  return m;
}

function udpPayload(frame: Uint8Array): Uint8Array {
  assert.equal((frame[12] << 8) | frame[13], 0x0800, "an IPv4 frame");
  assert.equal(frame[14 + 9], 17, "a UDP datagram");
  const ihl = (frame[14] & 15) * 4;
  const udpLen = (frame[14 + ihl + 4] << 8) | frame[14 + ihl + 5];
  return frame.subarray(14 + ihl + 8, 14 + ihl + udpLen);
}

const scenarios: Record<string, () => Promise<void>> = {
  /** Frames both ways, with mergeable buffers spanning chains and without them. */
  async frames() {
    for (const mrg of [true, false]) {
      const feats = VERSION_1 | EVENT_IDX | INDIRECT | bitOf(NET_F.MAC) | bitOf(NET_F.CSUM) |
        (mrg ? bitOf(NET_F.MRG_RXBUF) : 0n);
      const r = await rig(feats);
      const { got, sock } = await hostSocket();
      try {
        // Host -> guest. With mergeable buffers the guest posts 512-byte buffers, so a
        // 1400-byte datagram spans three chains; without, one 1536-byte chain per frame.
        const size = mrg ? 512 : 1536;
        const addrs = postRx(r, mrg ? 200 : 16, size, mrg ? 1 : 2);
        const heads = headMap(r, addrs, mrg ? 1 : 2, 0);
        const sent = [payloadOf(1400, 1), payloadOf(60, 2), payloadOf(900, 3)];
        for (const p of sent) await hostSend(sock, p);
        const frames = await receiveFrames(r, heads, 3, "three frames in the guest");
        assert.deepEqual(frames.map((f) => f.frame.subarray(0, 6)), sent.map(() => GUEST_MAC), "to our MAC");
        assert.deepEqual(frames.map((f) => udpPayload(f.frame)), sent, "payloads arrive intact and in order");
        if (mrg) {
          assert.equal(frames[0].hdr[10], 3, "num_buffers: 1400 bytes + headers in 512-byte buffers");
        }
        assert.equal(r.dev.stats.rxFrames, 3);
        // Guest -> host, with and without checksum offload, in one and in several descriptors.
        const out = [payloadOf(1000, 4), payloadOf(20, 5), payloadOf(1472, 6)];
        sendTx(r, udpFrame(r, out[0]), 3);
        sendTx(r, udpFrame(r, out[1], { offloadCsum: true }));
        sendTx(r, udpFrame(r, out[2], { offloadCsum: true }), 2);
        await until("three datagrams at the host", () => got.length >= 3);
        assert.deepEqual(got, out, "the host's sockets got what the guest sent");
        assert.deepEqual(r.tx.takeUsed().map(([, len]) => len), [0, 0, 0], "tx chains come back, used.len 0");
        assert.equal(r.dev.stats.txFrames, 3);
      } finally {
        sock.close();
        await r.close();
      }
    }
  },

  /** TUNSETOFFLOAD follows what the driver acknowledged; read back with ethtool. */
  async offloads() {
    const ethtool = async () => {
      const t = await sh(`ethtool -k ${TAP}`);
      const on = (k: string) => new RegExp(`^\\s*${k}: on`, "m").test(t);
      return {
        csum: on("tx-checksum-ip-generic"),
        tso4: on("tx-tcp-segmentation"),
        tso6: on("tx-tcp6-segmentation"),
        ecn: on("tx-tcp-ecn-segmentation"),
      };
    };
    const base = VERSION_1 | bitOf(NET_F.MAC) | bitOf(NET_F.MRG_RXBUF);
    const all = base | bitOf(NET_F.GUEST_CSUM) | bitOf(NET_F.GUEST_TSO4) | bitOf(NET_F.GUEST_TSO6) |
      bitOf(NET_F.GUEST_ECN);
    const cases: Array<[bigint, Record<string, boolean>]> = [
      [all, { csum: true, tso4: true, tso6: true, ecn: true }],
      [base | bitOf(NET_F.GUEST_CSUM) | bitOf(NET_F.GUEST_TSO4), {
        csum: true,
        tso4: true,
        tso6: false,
        ecn: false,
      }],
      [base, { csum: false, tso4: false, tso6: false, ecn: false }],
    ];
    for (const [feats, want] of cases) {
      const r = await rig(feats);
      const { sock } = await hostSocket();
      try {
        assert.deepEqual(await ethtool(), want, `offloads for features 0x${feats.toString(16)}`);
        // The same as seen in the frames: with checksum offload a local datagram arrives
        // with a partial checksum (NEEDS_CSUM), without it checksummed (flags 0).
        const addrs = postRx(r, 64, 2048);
        await hostSend(sock, payloadOf(100, 7));
        const frames = await receiveFrames(r, headMap(r, addrs, 1, 0), 1, "a frame");
        assert.equal(frames[0].hdr[0] & 1, want.csum ? 1 : 0, "VIRTIO_NET_HDR_F_NEEDS_CSUM");
      } finally {
        sock.close();
        await r.close();
      }
    }
  },

  /** No receive buffers while the TAP is flooded: no CPU spent, no memory held. */
  async flood() {
    const r = await rig(VERSION_1 | EVENT_IDX | bitOf(NET_F.MAC) | bitOf(NET_F.MRG_RXBUF));
    try {
      const flooder = new Deno.Command(Deno.execPath(), {
        args: [
          "eval",
          `import dgram from "node:dgram"; const s = dgram.createSocket("udp4"); const b = new Uint8Array(1400);
           const end = Date.now() + 3000; let n = 0;
           const go = () => { if (Date.now() > end) { console.log(n); s.close(); return; }
             for (let i = 0; i < 64; i++) { s.send(b, ${PORT}, "${GUEST_IP}"); n++; } setImmediate(go); };
           go();`,
        ],
        stdout: "piped",
      }).spawn();
      const rss = () => Number(/VmRSS:\s+(\d+)/.exec(Deno.readTextFileSync("/proc/self/status"))![1]) * 1024;
      const cpu = () => {
        const f = Deno.readTextFileSync("/proc/self/stat").split(") ")[1].split(" ");
        return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, in seconds (USER_HZ 100)
      };
      await sleep(300);
      const rss0 = rss(), cpu0 = cpu(), t0 = performance.now();
      const out = new TextDecoder().decode((await flooder.output()).stdout).trim();
      const secs = (performance.now() - t0) / 1000;
      const used = cpu() - cpu0, grew = rss() - rss0;
      const sent = Number(out);
      console.log(
        `flood: ${sent} datagrams in ${secs.toFixed(1)} s; device CPU ${
          used.toFixed(2)
        } s, RSS +${grew} bytes`,
      );
      assert.ok(sent > 10000, `the flood sent ${sent} datagrams`);
      assert.ok(
        used < 0.15 * secs,
        `the VMM side used ${used.toFixed(2)} s of CPU in ${secs.toFixed(1)} s of flood`,
      );
      assert.ok(grew < 16 << 20, `RSS grew by ${grew} bytes`);
      assert.equal(r.dev.stats.rxFrames, 0);
      // Buffers posted: the device reads again (the TAP's queue still holds frames).
      const addrs = postRx(r, 32, 2048);
      await until("frames after buffers were posted", () => r.dev.stats.rxFrames > 0);
      assert.ok(takeRx(r, headMap(r, addrs, 1, 0)).length > 0);
      assert.ok(r.dev.stats.rxStarved >= 1, "starvation counted");
    } finally {
      await r.close();
    }
  },

  /** A frame too large for the posted buffers is dropped and counted; the buffers serve the next. */
  async toobig() {
    const r = await rig(VERSION_1 | bitOf(NET_F.MAC)); // no MRG_RXBUF: one chain per frame
    const { sock } = await hostSocket();
    try {
      const addrs = postRx(r, 1, 600);
      await hostSend(sock, payloadOf(1000, 8));
      await until("the drop", () => r.dev.stats.rxDropTooBig === 1);
      assert.deepEqual(r.rx.takeUsed(), [], "nothing delivered, nothing truncated");
      await hostSend(sock, payloadOf(200, 9));
      const frames = await receiveFrames(r, headMap(r, addrs, 1, 0), 1, "the small frame");
      assert.deepEqual(udpPayload(frames[0].frame), payloadOf(200, 9));
    } finally {
      sock.close();
      await r.close();
    }
  },

  /** Hostile transmit chains are dropped and answered; the queue, receive and another device go on. */
  async hostile() {
    const r = await rig(VERSION_1 | bitOf(NET_F.MAC) | bitOf(NET_F.MRG_RXBUF) | INDIRECT);
    const { got, sock } = await hostSocket();
    // A bystander device on the same RAM and loop.
    const rngRam = new GuestRam(1 << 20);
    const rngDrv = new MmioDriver(
      new VirtioMmio(new VirtioRng({ fill: (b) => crypto.getRandomValues(b) }), rngRam.mem, { trigger() {} }),
    );
    rngDrv.negotiate(VERSION_1);
    const rq = new DriverQueue(rngRam, 16);
    rngDrv.setupQueue(0, rq);
    rngDrv.driverOk();
    try {
      const short = r.ram.alloc(8);
      r.tx.add([{ addr: short, len: 8 }]); // shorter than the header
      const w = r.ram.alloc(2048);
      r.tx.add([{ addr: w, len: 1024 }, { addr: w + 1024, len: 1024, write: true }]); // device-writable part
      const big = r.ram.alloc(70000);
      r.tx.add([{ addr: big, len: 70000 }]); // over 64 KiB + headers
      sendTx(r, udpFrame(r, payloadOf(300, 10)));
      await until("the good frame at the host", () => got.length === 1);
      assert.deepEqual(got[0], payloadOf(300, 10));
      assert.deepEqual(r.tx.takeUsed().map(([, l]) => l), [0, 0, 0, 0], "every chain answered");
      assert.equal(r.dev.stats.txDropBadChain, 2);
      assert.equal(r.dev.stats.txDropTooBig, 1);
      assert.equal(r.drv.status() & 64, 0, "no NEEDS_RESET for a bad frame");
      // A receive chain with a device-readable buffer is handed back empty.
      const bad = r.ram.alloc(4096);
      const badHead = r.rx.add([{ addr: bad, len: 2048 }, { addr: bad + 2048, len: 2048, write: true }]);
      r.drv.notify(0);
      assert.equal(r.dev.stats.rxBadChain, 1);
      assert.deepEqual(r.rx.takeUsed(), [[badHead, 0]]);
      // Receive still works, and so does the other device.
      const addrs = postRx(r, 8, 2048);
      await hostSend(sock, payloadOf(64, 11));
      await receiveFrames(r, headMap(r, addrs, 1, 2), 1, "a frame");
      rq.add([{ addr: rngRam.alloc(64), len: 64, write: true }]);
      rngDrv.notify(0);
      assert.deepEqual(rq.takeUsed().map(([, l]) => l), [64]);
    } finally {
      sock.close();
      await r.close();
    }
  },

  /**
   * A hostile driver: random descriptor tables, heads, flags, lengths (some past the end of
   * RAM, some huge), indirect tables and avail index jumps on both queues, while the host
   * sends datagrams. The device may ask for a reset, never crash, never write outside the
   * buffers it was given (a guard area no descriptor points at stays untouched), never grow
   * host memory; after a reset it works normally.
   */
  async fuzz() {
    const seed = Number(Deno.env.get("TSVMM_NET_FUZZ_SEED") ?? "20261201");
    const episodes = Number(Deno.env.get("TSVMM_NET_FUZZ_EPISODES") ?? "400");
    const rnd = new Prng(seed);
    const ram = new GuestRam(32 << 20);
    const guard = ram.alloc(1 << 20, 4096);
    const data = ram.alloc(4 << 20, 4096);
    const DATA = 4 << 20;
    ram.view(guard, 1 << 20).fill(0xa5);
    const feats = VERSION_1 | EVENT_IDX | INDIRECT | bitOf(NET_F.MAC) | bitOf(NET_F.CSUM) |
      bitOf(NET_F.GUEST_CSUM) | bitOf(NET_F.GUEST_TSO4) | bitOf(NET_F.MRG_RXBUF);
    let r = await rig(feats, { ram });
    const { sock } = await hostSocket();
    const rss0 = Number(/VmRSS:\s+(\d+)/.exec(Deno.readTextFileSync("/proc/self/status"))![1]) * 1024;
    let resets = 0;
    const randomBuf = () => {
      const len = rnd.chance(0.05) ? rnd.u32() : rnd.chance(0.1) ? 70000 : 1 + rnd.int(4096);
      if (rnd.chance(0.03)) return { addr: 0x7000_0000 + rnd.int(1 << 20), len }; // outside RAM
      const at = rnd.int(DATA);
      return { addr: data + at, len: Math.min(len, DATA - at) || 1 };
    };
    try {
      for (let ep = 0; ep < episodes; ep++) {
        for (const [qi, q] of [[0, r.rx], [1, r.tx]] as const) {
          const n = rnd.int(6);
          for (let k = 0; k < n; k++) {
            if (rnd.chance(0.15)) {
              // Raw descriptors: any index, flags and next.
              const b = randomBuf();
              q.setDesc(rnd.int(q.size), b.addr, b.len, rnd.int(8), rnd.int(q.size + 4));
              q.publish(rnd.int(q.size + 2));
            } else {
              const bufs = Array.from({ length: 1 + rnd.int(4) }, () => ({
                ...randomBuf(),
                write: qi === 0 ? !rnd.chance(0.05) : rnd.chance(0.05),
              }));
              q.add(bufs, { indirect: rnd.chance(0.3) });
            }
          }
          if (rnd.chance(0.02)) q.setAvailIdx(rnd.int(0x10000));
          r.drv.notify(rnd.chance(0.02) ? 7 : qi);
        }
        for (let k = rnd.int(3); k > 0; k--) await hostSend(sock, payloadOf(1 + rnd.int(1472), ep));
        await sleep(rnd.int(3));
        if (rnd.chance(0.3)) {
          r.rx.takeUsed();
          r.tx.takeUsed();
        }
        if ((r.drv.status() & 64) || rnd.chance(0.02)) {
          resets++;
          await r.close();
          r = await rig(feats, { ram });
        }
        assert.ok(ram.view(guard, 1 << 20).every((b) => b === 0xa5), `episode ${ep}: the guard area changed`);
      }
      // After all that, a fresh start works normally.
      await r.close();
      r = await rig(feats, { ram });
      const addrs = postRx(r, 64, 2048);
      await hostSend(sock, payloadOf(777, 1));
      const frames = await receiveFrames(r, headMap(r, addrs, 1, 0), 1, "a frame after the fuzzing");
      assert.deepEqual(udpPayload(frames[0].frame), payloadOf(777, 1));
      const rss = Number(/VmRSS:\s+(\d+)/.exec(Deno.readTextFileSync("/proc/self/status"))![1]) * 1024;
      console.log(`fuzz: seed ${seed}, ${episodes} episodes, ${resets} resets, RSS +${rss - rss0} bytes`);
      assert.ok(rss - rss0 < 64 << 20, `RSS grew by ${rss - rss0} bytes`);
    } finally {
      sock.close();
      await r.close();
    }
  },

  /** Teardown in the VMM's order (event loop stopped, then the device reset, then the TAP closed). */
  async teardown() {
    const r = await rig(VERSION_1 | bitOf(NET_F.MAC) | bitOf(NET_F.MRG_RXBUF));
    postRx(r, 64, 2048); // receive is watching the TAP now
    r.backend.refuse = 1;
    sendTx(r, udpFrame(r, payloadOf(10, 1))); // and transmit waits for EPOLLOUT
    await r.loop.stop();
    await r.drv.w32(0x070, 0);
    assert.equal(r.drv.status(), 0, "the reset completed");
    r.tap.close();
  },

  /** A TAP fd opened elsewhere (as a jailer would hand one over) is adopted: name, nonblocking, frames. */
  async fd() {
    const fd = sysOpen("/dev/net/tun", 2); // O_RDWR, blocking, as a parent might open it
    const req = new Uint8Array(40);
    req.set(new TextEncoder().encode(TAP));
    new DataView(req.buffer).setUint16(16, 0x0002 | 0x1000 | 0x4000, true); // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    assert.equal(libc().ioctl(fd, 0x400454can, req), 0, "TUNSETIFF");
    const r = await rig(VERSION_1 | bitOf(NET_F.MAC) | bitOf(NET_F.MRG_RXBUF), { fd });
    const { got, sock } = await hostSocket();
    try {
      assert.equal(r.tap.name, TAP);
      assert.equal(r.tap.readFrame([new Uint8Array(2048)]), -11, "nonblocking: nothing waiting is EAGAIN");
      sendTx(r, udpFrame(r, payloadOf(500, 15)));
      await until("the datagram at the host", () => got.length === 1);
      assert.deepEqual(got[0], payloadOf(500, 15));
    } finally {
      sock.close();
      await r.close();
    }
  },

  /**
   * On a device thread the device is rehearsed before the guest uses it (vmm/rehearsal.ts),
   * over a loopback: every rehearsed frame came back, none reached the TAP, and the guest's
   * own device then gets its ping answered.
   */
  async warmup() {
    const RAM = 8 << 20;
    const ptr = mmapAnonymous(RAM);
    const ram = new GuestRam(RAM, 0, new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, RAM)));
    const thread = new DeviceThread(
      { base: BigInt(Deno.UnsafePointer.value(ptr)), size: RAM, regions: [{ gpa: 0, offset: 0, size: RAM }] },
      DEVICE_THREAD_NICE,
      500,
      60_000, // time enough on a loaded host: every frame is to be rehearsed
      60_000,
    );
    const tap = Tap.open({ name: TAP });
    const fds = [sysEventfd(), sysEventfd(), sysEventfd()];
    const isr = privateCell();
    // The frames the VMM wrote into the TAP: what its interface received, from /proc/net/dev.
    const written = () => {
      const line = Deno.readTextFileSync("/proc/self/net/dev").split("\n").find((l) =>
        l.trim().startsWith(TAP + ":")
      );
      return Number(line!.split(":")[1].trim().split(/\s+/)[1]);
    };
    try {
      const hostMac = await hostSide();
      const dev = thread.remote(new VirtioNet(tap, { mac: GUEST_MAC }), {
        kind: "net",
        tapFd: tap.fd,
        mac: GUEST_MAC,
      });
      dev.bind(fds.slice(0, 2), {
        isr: { buffer: isr.array.buffer as SharedArrayBuffer, index: isr.index },
        lineFd: fds[2],
      });
      let report = "";
      for (let i = 0; i < 2000 && !/warmup=\d/.test(report); i++) {
        await thread.refresh();
        report = dev.describe();
        await sleep(5);
      }
      assert.match(report, /warmup=500\/500,\d+ms( |$)/, "every rehearsed frame came back");
      assert.equal(written(), 0, "no rehearsed frame reached the TAP");
      const r = {
        ram,
        hostMac,
        ...netDriver(
          dev,
          ram,
          VERSION_1 | EVENT_IDX | INDIRECT | bitOf(NET_F.MAC) | bitOf(NET_F.MRG_RXBUF),
          isr,
        ),
      };
      const heads = headMap(r, postRx(r, 16, 2048), 1, 0);
      sendTx(r, echoFrame(r, 0x5757, 1));
      const [reply] = await receiveFrames(r, heads, 1, "the echo reply");
      const icmp = 14 + (reply.frame[14] & 15) * 4;
      assert.deepEqual([reply.frame[icmp], (reply.frame[icmp + 4] << 8) | reply.frame[icmp + 5]], [
        0,
        0x5757,
      ]);
      assert.equal(written(), 1, "the guest's request, and only it, went to the TAP");
      await r.drv.w32(0x070, 0);
    } finally {
      await thread.stop();
      tap.close();
      for (const fd of fds) sysClose(fd);
      sysMunmap(ptr, RAM);
    }
  },

  /** A TAP that is full (EAGAIN) holds transmit until it is writable again; nothing is lost. */
  /**
   * The host's stack answers a frame before the TAP write returns (an echo reply here). The
   * device takes that answer in the pass that sent the frame, without waiting for the loop to
   * report the TAP readable: the backend here never reports it.
   */
  async answer() {
    const r = await rig(VERSION_1 | EVENT_IDX | bitOf(NET_F.MAC) | bitOf(NET_F.MRG_RXBUF));
    try {
      r.backend.deaf = true;
      const addrs = postRx(r, 64, 2048);
      const heads = headMap(r, addrs, 1, 0);
      for (let seq = 1; seq <= 3; seq++) {
        sendTx(r, echoFrame(r, 0x7a7a, seq));
        // No await between the notify and this check: the reply came in with the transmit.
        const got = takeRx(r, heads);
        assert.equal(got.length, 1, `echo ${seq}: the reply is in the receive ring when the notify returns`);
        const f = got[0].frame;
        assert.deepEqual(f.subarray(0, 6), GUEST_MAC, "to our MAC");
        assert.equal(f[14 + 9], 1, "an ICMP packet");
        const icmp = 14 + (f[14] & 15) * 4;
        assert.deepEqual([f[icmp], (f[icmp + 4] << 8) | f[icmp + 5], (f[icmp + 6] << 8) | f[icmp + 7]], [
          0,
          0x7a7a,
          seq,
        ], "the echo reply to this request");
        assert.deepEqual(r.tx.takeUsed().map(([, len]) => len), [0], "the request's chain is used");
      }
      assert.equal(r.dev.stats.rxFrames, 3);
    } finally {
      await r.close();
    }
  },

  async eagain() {
    const r = await rig(VERSION_1 | bitOf(NET_F.MAC) | bitOf(NET_F.MRG_RXBUF));
    const { got, sock } = await hostSocket();
    try {
      r.backend.refuse = 1;
      const sent = [payloadOf(100, 12), payloadOf(200, 13), payloadOf(300, 14)];
      sendTx(r, udpFrame(r, sent[0]));
      assert.equal(r.dev.stats.txBlocked, 1, "the first write met EAGAIN");
      sendTx(r, udpFrame(r, sent[1]));
      sendTx(r, udpFrame(r, sent[2]));
      await until("all three at the host", () => got.length === 3);
      assert.deepEqual(got, sent, "in order, none lost");
      assert.equal(r.dev.stats.txFrames, 3);
    } finally {
      sock.close();
      await r.close();
    }
  },
};

if (import.meta.main) {
  const name = Deno.args[0];
  const run = scenarios[name];
  if (!run) {
    console.error(`scenarios: ${Object.keys(scenarios).join(", ")}`);
    Deno.exit(2);
  }
  // Only in a network namespace with nothing but loopback (made by the caller for this run).
  const ifaces = Deno.readTextFileSync("/proc/self/net/dev").split("\n").slice(2)
    .map((l) => l.split(":")[0].trim()).filter((n) => n && n !== "lo");
  if (ifaces.length) {
    console.error(`refusing to run outside a private network namespace (interfaces: ${ifaces.join(" ")})`);
    Deno.exit(2);
  }
  // No IPv6: the TAP would send router and multicast listener messages of its own.
  await sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
  await run();
  console.log(`scenario ${name}: ok`);
  Deno.exit(0);
}
