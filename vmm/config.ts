/** VM configuration: the shape users write (CLI and mod.ts) and its validation. */

import { type CpuidBitChange, parseCpuidMask } from "./arch/x86_64/cpuid.ts";
import { badInterfaceName, macForName, parseMac } from "./tap.ts";

/**
 * How a virtio device is reached: "pci" (modern virtio-PCI with MSI-X), "pci-legacy"
 * (virtio 0.9.5 over PCI), "pci-transitional" (one function with both), "mmio"
 * (virtio-MMIO version 2) or "mmio-legacy" (virtio-MMIO version 1).
 */
export type TransportKind = "pci" | "pci-legacy" | "pci-transitional" | "mmio" | "mmio-legacy";

/** Every transport, in the order the help lists them. */
export const TRANSPORTS: readonly TransportKind[] = [
  "pci",
  "pci-legacy",
  "pci-transitional",
  "mmio",
  "mmio-legacy",
];

/** A virtio-blk disk. */
export interface DiskConfig {
  /** Raw image file (or block device). */
  path: string;
  /** Offer VIRTIO_BLK_F_RO and refuse writes. */
  readonly?: boolean;
  /** GET_ID serial, up to 20 bytes (default: derived from the image path). */
  serial?: string;
  /** Transport (default "pci"). */
  transport?: TransportKind;
}

/** A virtio-rng device. */
export interface RngConfig {
  /** Transport (default "pci"). */
  transport?: TransportKind;
  /** Rate limit in bytes per second (default: none). */
  rateBytesPerSec?: number;
  /** Largest answer to one request (default 64 KiB). */
  maxRequestBytes?: number;
}

/** A virtio-net interface backed by a Linux TAP. */
export interface NetConfig {
  /** TAP interface name: attached if it exists, else created (needs CAP_NET_ADMIN) for the VM's life. */
  tap?: string;
  /** Instead of a name: an open TAP fd handed over by a parent process (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR). */
  fd?: number;
  /** MAC address the guest sees, "52:54:00:12:34:56" (default: derived from the TAP name). */
  mac?: string;
  /** MTU advertised to the guest (VIRTIO_NET_F_MTU), 68 to 65535 (default: not advertised, 1500). */
  mtu?: number;
  /** Transport (default "pci"). */
  transport?: TransportKind;
}

/** How the kernel is entered. */
export type BootProtocol = "auto" | "linux64" | "pvh";

/** A VM's configuration. */
export interface VmConfig {
  /** Path to a bzImage or an ELF vmlinux. */
  kernel?: string;
  /**
   * Instead of a kernel: flat 64-bit code run at `at` (default 1 MiB) with the first GiB
   * identity-mapped. For tiny test guests and examples.
   */
  program?: { code: Uint8Array; at?: number };
  /** Path to an initramfs. */
  initrd?: string;
  /** Kernel command line. */
  cmdline?: string;
  /** Number of vCPUs (default 1). */
  cpus?: number;
  /** Guest RAM in MiB (default 512). */
  memoryMiB?: number;
  /** CPUID changes: a spec such as "-cx16,-xsave" or a parsed list. */
  cpuidMask?: string | CpuidBitChange[];
  /** Boot a bzImage's unpacked vmlinux instead of running its decompressor. */
  unpackKernel?: boolean;
  /**
   * Give the vCPUs host CPUs of their own: of the CPUs this process may use, the first runs
   * every other thread of the process and vCPU i the (i mod (n - 1))-th of the rest, for
   * the VM's life (needs 2 or more).
   */
  pinVcpus?: boolean;
  /**
   * Serve the virtio queues on a device thread of their own that blocks in epoll_wait (the
   * default), rather than from the main thread's event loop (false; slower, kept to compare).
   */
  deviceThread?: boolean;
  /**
   * Map each virtio-MMIO window's registers into the guest as a read-only page that the VMM
   * keeps up to date (the default, where KVM has read-only memory), so the driver's register
   * reads (InterruptStatus on every interrupt) do not exit; false: every access exits.
   */
  mmioRegisterPages?: boolean;
  /** For ELF kernels: PVH entry when the note is there ("auto"), or force one. */
  bootProtocol?: BootProtocol;
  /** Connect the serial console to this process's stdin/stdout. */
  stdio?: boolean;
  /** Path of the KVM device (default /dev/kvm). */
  kvmDevice?: string;
  /** virtio-blk disks. */
  disks?: DiskConfig[];
  /** A virtio-rng device (true for the defaults). */
  rng?: boolean | RngConfig;
  /** virtio-net interfaces. */
  nets?: NetConfig[];
}

/** The default kernel command line. */
export const DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1";

/** Smallest RAM we accept. */
export const MIN_MEMORY_MIB = 16;

/** A configuration error a user can fix; printed as one line. */
export class ConfigError extends Error {
  /** Builds the error. */
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

/** A validated configuration with defaults applied. */
export interface ResolvedConfig {
  /** Kernel path ("" with a program). */
  kernel: string;
  /** Raw program instead of a kernel. */
  program?: { code: Uint8Array; at: number };
  /** Initrd path. */
  initrd?: string;
  /** Command line. */
  cmdline: string;
  /** vCPUs. */
  cpus: number;
  /** RAM bytes. */
  memoryBytes: number;
  /** CPUID changes. */
  cpuid: CpuidBitChange[];
  /** Unpack bzImage. */
  unpackKernel: boolean;
  /** Pin vCPU threads. */
  pinVcpus: boolean;
  /** Virtio queues on the device thread. */
  deviceThread: boolean;
  /** virtio-MMIO register pages mapped read-only where KVM can. */
  mmioRegisterPages: boolean;
  /** Entry protocol choice. */
  bootProtocol: BootProtocol;
  /** Console on stdio. */
  stdio: boolean;
  /** KVM device path. */
  kvmDevice: string;
  /** Disks, validated. */
  disks: Array<Required<Omit<DiskConfig, "serial">> & { serial?: string }>;
  /** The rng device, if any. */
  rng?: Required<Pick<RngConfig, "transport">> & RngConfig;
  /** Net interfaces, validated (mac undefined: derived from the TAP's name once it is open). */
  nets: Array<{ tap?: string; fd?: number; mac?: Uint8Array; mtu?: number; transport: TransportKind }>;
}

function hostMemoryMiB(): number | undefined {
  try {
    const m = /MemTotal:\s+(\d+) kB/.exec(Deno.readTextFileSync("/proc/meminfo"));
    return m ? Math.floor(Number(m[1]) / 1024) : undefined;
  } catch {
    return undefined;
  }
}

/** Applies defaults and checks ranges; throws ConfigError with a one-line message. */
export function resolveConfig(c: VmConfig): ResolvedConfig {
  if (!c.kernel && !c.program) throw new ConfigError("No kernel given (--kernel PATH)");
  const cpus = c.cpus ?? 1;
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 254) {
    throw new ConfigError(`--cpus must be an integer from 1 to 254, not ${c.cpus}`);
  }
  const mib = c.memoryMiB ?? 512;
  if (!Number.isInteger(mib) || mib < MIN_MEMORY_MIB) {
    throw new ConfigError(
      `--memory must be an integer of at least ${MIN_MEMORY_MIB} (MiB), not ${c.memoryMiB}`,
    );
  }
  const host = hostMemoryMiB();
  if (host !== undefined && mib > host) {
    throw new ConfigError(`--memory ${mib} MiB is more than this host's ${host} MiB of RAM`);
  }
  if (c.pinVcpus && navigator.hardwareConcurrency < 2) {
    throw new ConfigError(
      `--pin-vcpus needs at least 2 host CPUs (one for the VMM, one or more for vCPUs); this process may use ${navigator.hardwareConcurrency}`,
    );
  }
  let cpuid: CpuidBitChange[] = [];
  try {
    cpuid = typeof c.cpuidMask === "string" ? parseCpuidMask(c.cpuidMask) : c.cpuidMask ?? [];
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  const proto = c.bootProtocol ?? "auto";
  if (!["auto", "linux64", "pvh"].includes(proto)) {
    throw new ConfigError(`--boot-protocol must be auto, linux64 or pvh, not "${proto}"`);
  }
  const transport = (t: string | undefined, what: string): TransportKind => {
    const v = t ?? "pci";
    if (!(TRANSPORTS as readonly string[]).includes(v)) {
      throw new ConfigError(`${what}: transport must be ${TRANSPORTS.join(", ")}, not "${v}"`);
    }
    return v as TransportKind;
  };
  const disks = (c.disks ?? []).map((d) => {
    if (!d.path) throw new ConfigError("--disk needs a path");
    if (d.serial !== undefined) {
      const bytes = new TextEncoder().encode(d.serial);
      if (bytes.length === 0 || bytes.length > 20 || bytes.every((b) => b === 0)) {
        throw new ConfigError(`--disk ${d.path}: serial must be 1 to 20 bytes, not all zero`);
      }
    }
    return {
      path: d.path,
      readonly: d.readonly ?? false,
      serial: d.serial,
      transport: transport(d.transport, `--disk ${d.path}`),
    };
  });
  let rng: ResolvedConfig["rng"];
  if (c.rng) {
    const r = c.rng === true ? {} : c.rng;
    if (r.rateBytesPerSec !== undefined && !(r.rateBytesPerSec > 0)) {
      throw new ConfigError(`--rng-rate must be a positive number of bytes per second`);
    }
    if (r.maxRequestBytes !== undefined && !(Number.isInteger(r.maxRequestBytes) && r.maxRequestBytes > 0)) {
      throw new ConfigError(`rng maxRequestBytes must be a positive integer`);
    }
    rng = { ...r, transport: transport(r.transport, "--rng") };
  }
  const seen = new Set<string>();
  const nets = (c.nets ?? []).map((n) => {
    const what = n.tap !== undefined ? `--net tap=${n.tap}` : `--net fd=${n.fd}`;
    if ((n.tap === undefined) === (n.fd === undefined)) {
      throw new ConfigError("--net needs either tap=NAME or fd=N");
    }
    if (n.tap !== undefined) {
      const bad = badInterfaceName(n.tap);
      if (bad) throw new ConfigError(`${what}: ${bad}`);
    }
    if (n.fd !== undefined && !(Number.isInteger(n.fd) && n.fd >= 0)) {
      throw new ConfigError(`${what}: fd must be a file descriptor number`);
    }
    const key = n.tap ?? `fd ${n.fd}`;
    if (seen.has(key)) throw new ConfigError(`${what} is given twice`);
    seen.add(key);
    if (n.mtu !== undefined && !(Number.isInteger(n.mtu) && n.mtu >= 68 && n.mtu <= 65535)) {
      throw new ConfigError(`${what}: mtu must be an integer from 68 to 65535, not ${n.mtu}`);
    }
    let mac: Uint8Array | undefined;
    try {
      mac = n.mac !== undefined ? parseMac(n.mac) : n.tap !== undefined ? macForName(n.tap) : undefined;
    } catch (e) {
      throw new ConfigError(`${what}: ${(e as Error).message}`);
    }
    return { tap: n.tap, fd: n.fd, mac, mtu: n.mtu, transport: transport(n.transport, what) };
  });
  const macs = nets.filter((n) => n.mac).map((n) => n.mac!.join(":"));
  if (new Set(macs).size !== macs.length) throw new ConfigError("two --net interfaces have the same MAC");
  return {
    disks,
    rng,
    nets,
    kernel: c.kernel ?? "",
    program: c.program ? { code: c.program.code, at: c.program.at ?? 0x100000 } : undefined,
    initrd: c.initrd,
    cmdline: c.cmdline ?? DEFAULT_CMDLINE,
    cpus,
    memoryBytes: mib * 1024 * 1024,
    cpuid,
    unpackKernel: c.unpackKernel ?? false,
    pinVcpus: c.pinVcpus ?? false,
    deviceThread: c.deviceThread ?? true,
    mmioRegisterPages: c.mmioRegisterPages ?? true,
    bootProtocol: proto,
    stdio: c.stdio ?? false,
    kvmDevice: c.kvmDevice ?? "/dev/kvm",
  };
}
