/**
 * A Linux TAP device as a virtio-net backend. The fd is nonblocking: frames are read
 * and written with readv/writev straight between the TAP and guest RAM on the device
 * thread (a TAP never blocks, so no helper thread is needed), and the event loop's
 * epoll says when the TAP is readable or, after EAGAIN, writable again.
 *
 * Frames carry the virtio-net header (IFF_VNET_HDR); its size and the receive offloads
 * (TUNSETOFFLOAD) follow what the guest's driver acknowledged.
 */

import type { NetBackend, NetOffloads } from "../devices/virtio/net.ts";
import { EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, type EventLoop, type FdWatch } from "./event_loop.ts";
import { errno, errnoName, libc, sysClose, SysError, sysOpen } from "./sys/libc.ts";
import { IOV_MAX, Iovecs } from "./sys/iovec.ts";

const O_RDWR = 2;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const F_GETFL = 3;
const F_SETFL = 4;
const TUNSETIFF = 0x400454can;
const TUNSETPERSIST = 0x400454cbn;
const TUNSETOFFLOAD = 0x400454d0n;
const TUNGETIFF = 0x800454d2n;
const TUNSETVNETHDRSZ = 0x400454d8n;
const IFF_TUN = 0x0001;
const IFF_TAP = 0x0002;
const IFF_NO_PI = 0x1000;
const IFF_VNET_HDR = 0x4000;
/** TUNSETOFFLOAD bits. */
export const TUN_F = { CSUM: 0x01, TSO4: 0x02, TSO6: 0x04, TSO_ECN: 0x08, UFO: 0x10 } as const;
const IFNAMSIZ = 16;
const IFREQ_SIZE = 40;
const EAGAIN = 11;

/** A TAP that cannot be used; the message is one line for the user. */
export class TapError extends Error {
  /** Builds the error. */
  constructor(message: string) {
    super(message);
    this.name = "TapError";
  }
}

/** Why `name` cannot name a network interface, or undefined if it can. */
export function badInterfaceName(name: string): string | undefined {
  if (name.length === 0 || new TextEncoder().encode(name).length > IFNAMSIZ - 1) {
    return "an interface name has 1 to 15 bytes";
  }
  if (/[\s/:,]/.test(name) || name === "." || name === "..") {
    return "an interface name has no spaces, '/', ':' or ','";
  }
  return undefined;
}

function ifreq(name: string, flags: number): Uint8Array {
  const r = new Uint8Array(IFREQ_SIZE);
  r.set(new TextEncoder().encode(name), 0);
  new DataView(r.buffer).setUint16(IFNAMSIZ, flags, true);
  return r;
}

function openTunDevice(): number {
  try {
    return sysOpen("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  } catch (e) {
    const code = (e as SysError).errno;
    if (code === 2 || code === 19) throw new TapError("/dev/net/tun is missing (load the tun module)");
    if (code === 13 || code === 1) throw new TapError("cannot open /dev/net/tun: permission denied");
    throw new TapError(`cannot open /dev/net/tun: ${(e as Error).message}`);
  }
}

/** Whether this network namespace has an interface `name` (sysfs may show another namespace's). */
function interfaceExists(name: string): boolean {
  return libc().if_nametoindex(new TextEncoder().encode(name + "\0")) !== 0;
}

/**
 * Creates a persistent TAP `name` (for a test or a setup script that gives the host side
 * an address before a VM attaches). Needs CAP_NET_ADMIN.
 */
export function createPersistentTap(name: string): void {
  const bad = badInterfaceName(name);
  if (bad) throw new TapError(`TAP "${name}": ${bad}`);
  setPersist(name, true);
}

/** Removes a persistent TAP made by `createPersistentTap` (nothing if it is gone). */
export function removePersistentTap(name: string): void {
  if (interfaceExists(name)) setPersist(name, false);
}

/** Attaches to (or creates) TAP `name` for a moment and sets whether it outlives its last fd. */
function setPersist(name: string, on: boolean): void {
  const fd = openTunDevice();
  try {
    if (libc().ioctl(fd, TUNSETIFF, ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)) < 0) {
      throw new SysError(`TUNSETIFF ${name}`, errno());
    }
    if (libc().ioctl_val(fd, TUNSETPERSIST, on ? 1n : 0n) < 0) {
      throw new SysError(`TUNSETPERSIST ${name}`, errno());
    }
  } finally {
    sysClose(fd);
  }
}

/** Which TAP to use: by name (attached, or created when missing) or an fd from a parent. */
export interface TapSource {
  /** Interface name. */
  name?: string;
  /** An open TAP fd (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) handed over by a parent process. */
  fd?: number;
}

/** An open TAP. */
export class Tap implements NetBackend {
  /** Whether this process created the interface (it goes away when the fd closes). */
  readonly created: boolean;
  /** The iovec array every frame is read or written through. */
  private readonly iov = new Iovecs();
  private watch: FdWatch | undefined;
  private wantRead: (() => void) | undefined;
  private wantWrite: (() => void) | undefined;
  private closed = false;

  private constructor(readonly fd: number, readonly name: string, created: boolean) {
    this.created = created;
  }

  /** Opens the TAP; throws TapError with a one-line message. */
  static open(src: TapSource): Tap {
    if (src.fd !== undefined) return Tap.adopt(src.fd);
    const name = src.name ?? "";
    const bad = badInterfaceName(name);
    if (bad) throw new TapError(`TAP "${name}": ${bad}`);
    const exists = interfaceExists(name);
    const fd = openTunDevice();
    const req = ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    const attach = () => libc().ioctl(fd, TUNSETIFF, req) < 0 ? errno() : 0;
    let e = attach();
    // errno is read by a second FFI call, and the runtime may make a failing system call of its
    // own in between (seen once: ENOENT for a TAP refused with EPERM). TUNSETIFF fails with
    // EBUSY, EINVAL, EPERM or EACCES for the reasons below; anything else is asked again.
    for (let again = 0; again < 2 && e !== 0 && ![1, 13, 16, 22].includes(e); again++) e = attach();
    if (e !== 0) {
      sysClose(fd);
      if (e === 16) throw new TapError(`TAP "${name}" is busy: another process has it open`);
      if (e === 22 && exists) throw new TapError(`"${name}" is a network interface but not a TAP`);
      if (e === 1 || e === 13) {
        throw new TapError(
          exists
            ? `cannot attach TAP "${name}": permission denied (it belongs to another user; needs CAP_NET_ADMIN)`
            : `cannot create TAP "${name}": permission denied (needs CAP_NET_ADMIN, or create it first: ip tuntap add ${name} mode tap user USER)`,
        );
      }
      throw new TapError(`cannot ${exists ? "attach" : "create"} TAP "${name}": ${errnoName(e)}`);
    }
    const tap = new Tap(fd, name, !exists);
    tap.setHeaderSize(12);
    return tap;
  }

  private static adopt(fd: number): Tap {
    if (!Number.isInteger(fd) || fd < 0) throw new TapError(`TAP fd ${fd} is not a file descriptor number`);
    const fl = libc().fcntl(fd, F_GETFL, 0n);
    if (fl < 0) throw new TapError(`TAP fd ${fd} is not open in this process`);
    const r = new Uint8Array(IFREQ_SIZE);
    if (libc().ioctl(fd, TUNGETIFF, r) < 0) throw new TapError(`fd ${fd} is not a TUN/TAP device`);
    const flags = new DataView(r.buffer).getUint16(IFNAMSIZ, true);
    const name = new TextDecoder().decode(r.subarray(0, r.indexOf(0)));
    const need = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if ((flags & (need | IFF_TUN)) !== need) {
      throw new TapError(
        `TAP fd ${fd} (${name}) must be opened with IFF_TAP, IFF_NO_PI and IFF_VNET_HDR (flags 0x${
          flags.toString(16)
        })`,
      );
    }
    if (libc().fcntl(fd, F_SETFL, BigInt(fl | O_NONBLOCK)) < 0) throw new SysError("fcntl", errno());
    const tap = new Tap(fd, name, false);
    tap.setHeaderSize(12);
    return tap;
  }

  /** Lets `loop` tell the device when the TAP is readable or writable. */
  attach(loop: EventLoop): void {
    this.watch = loop.watch(this.fd, (ev) => {
      if (ev & (EPOLLERR | EPOLLHUP)) {
        // The interface went away (or broke): stop watching rather than spin.
        this.watch?.set(0);
        return;
      }
      if (ev & EPOLLOUT) this.wantWrite?.();
      if (ev & EPOLLIN) this.wantRead?.();
    });
    this.rewatch();
  }

  private rewatch(): void {
    if (this.closed) return;
    this.watch?.set((this.wantRead ? EPOLLIN : 0) | (this.wantWrite ? EPOLLOUT : 0));
  }

  /** Reads one frame into `bufs`; the length, or a negative errno (-EAGAIN: none waiting). */
  readFrame(bufs: Uint8Array[]): number {
    if (this.closed) return -EAGAIN;
    const n = Number(libc().readv(this.fd, this.iov.ptr, this.iov.fill(bufs)));
    return n < 0 ? -errno() : n;
  }

  /** Writes one frame; bytes written or a negative errno (-EAGAIN: the TAP's queue is full). */
  writeFrame(bufs: Uint8Array[]): number {
    if (this.closed) return -EAGAIN;
    if (bufs.length > IOV_MAX) return -22;
    const n = Number(libc().writev(this.fd, this.iov.ptr, this.iov.fill(bufs)));
    return n < 0 ? -errno() : n;
  }

  /** TUNSETVNETHDRSZ. */
  setHeaderSize(bytes: number): void {
    if (this.closed) return;
    const v = new Int32Array([bytes]);
    if (libc().ioctl(this.fd, TUNSETVNETHDRSZ, new Uint8Array(v.buffer)) < 0) {
      throw new SysError(`TUNSETVNETHDRSZ ${this.name}`, errno());
    }
  }

  /** TUNSETOFFLOAD from the guest's receive offloads. */
  setOffloads(o: NetOffloads): void {
    if (this.closed) return;
    const flags = (o.csum ? TUN_F.CSUM : 0) | (o.tso4 ? TUN_F.TSO4 : 0) | (o.tso6 ? TUN_F.TSO6 : 0) |
      (o.ecn ? TUN_F.TSO_ECN : 0) | (o.ufo ? TUN_F.UFO : 0);
    if (libc().ioctl_val(this.fd, TUNSETOFFLOAD, BigInt(flags)) < 0) {
      throw new SysError(`TUNSETOFFLOAD 0x${flags.toString(16)} ${this.name}`, errno());
    }
  }

  /** Readable callback (undefined: the fd is not watched for reading). */
  onReadable(fn: (() => void) | undefined): void {
    this.wantRead = fn;
    this.rewatch();
  }

  /** Writable callback (undefined: not watched for writing). */
  onWritable(fn: (() => void) | undefined): void {
    this.wantWrite = fn;
    this.rewatch();
  }

  /** Stops watching and closes the fd (a TAP this process created disappears with it). */
  close(): void {
    if (this.closed) return;
    this.watch?.close();
    this.closed = true;
    sysClose(this.fd);
  }
}

/** A stable locally administered MAC for a TAP name: 52:54:00 and three bytes of its FNV-1a hash. */
export function macForName(name: string): Uint8Array {
  let h = 0x811c9dc5;
  for (const b of new TextEncoder().encode(name)) h = Math.imul(h ^ b, 0x01000193) >>> 0;
  return new Uint8Array([0x52, 0x54, 0x00, (h >>> 16) & 0xff, (h >>> 8) & 0xff, h & 0xff]);
}

/** Parses "52:54:00:12:34:56"; throws TapError for anything that is not a unicast MAC. */
export function parseMac(s: string): Uint8Array {
  const m = /^([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2})$/i.exec(s);
  if (!m) throw new TapError(`MAC "${s}" is not six hex bytes such as 52:54:00:12:34:56`);
  const mac = new Uint8Array(m.slice(1).map((x) => parseInt(x, 16)));
  if (mac[0] & 1) throw new TapError(`MAC "${s}" is a multicast address`);
  if (mac.every((b) => b === 0)) throw new TapError(`MAC "${s}" is all zero`);
  return mac;
}
