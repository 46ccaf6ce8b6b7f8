/** Typed wrappers for the KVM system fd (/dev/kvm) and the VM fd. */

import { errno, libc, sysClose, SysError, sysOpen } from "./sys/libc.ts";
import { CAP, KVM, SIZE } from "./sys/kvm_abi.ts";

/** Runs an ioctl with a buffer argument; throws SysError naming the ioctl. */
export function ioctlBuf(fd: number, req: bigint, buf: Uint8Array | null, name: string): number {
  const r = libc().ioctl(fd, req, buf as Uint8Array<ArrayBuffer> | null);
  if (r < 0) throw new SysError(name, errno());
  return r;
}

/** Runs an ioctl with an integer argument; throws SysError naming the ioctl. */
export function ioctlVal(fd: number, req: bigint, val: bigint, name: string): number {
  const r = libc().ioctl_val(fd, req, val);
  if (r < 0) throw new SysError(name, errno());
  return r;
}

/** One CPUID leaf as KVM reports and takes it. */
export interface CpuidEntry {
  /** Leaf (EAX input). */
  fn: number;
  /** Subleaf (ECX input). */
  index: number;
  /** KVM_CPUID_FLAG_* bits. */
  flags: number;
  /** Output registers. */
  eax: number;
  /** Output registers. */
  ebx: number;
  /** Output registers. */
  ecx: number;
  /** Output registers. */
  edx: number;
}

/** Encodes CPUID entries as struct kvm_cpuid2. */
export function encodeCpuid(entries: CpuidEntry[]): Uint8Array {
  const buf = new Uint8Array(8 + entries.length * SIZE.cpuidEntry);
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, entries.length, true);
  entries.forEach((e, i) => {
    const o = 8 + i * SIZE.cpuidEntry;
    dv.setUint32(o, e.fn, true);
    dv.setUint32(o + 4, e.index, true);
    dv.setUint32(o + 8, e.flags, true);
    dv.setUint32(o + 12, e.eax >>> 0, true);
    dv.setUint32(o + 16, e.ebx >>> 0, true);
    dv.setUint32(o + 20, e.ecx >>> 0, true);
    dv.setUint32(o + 24, e.edx >>> 0, true);
  });
  return buf;
}

/** Decodes struct kvm_cpuid2. */
export function decodeCpuid(buf: Uint8Array): CpuidEntry[] {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const n = dv.getUint32(0, true);
  const out: CpuidEntry[] = [];
  for (let i = 0; i < n; i++) {
    const o = 8 + i * SIZE.cpuidEntry;
    out.push({
      fn: dv.getUint32(o, true),
      index: dv.getUint32(o + 4, true),
      flags: dv.getUint32(o + 8, true),
      eax: dv.getUint32(o + 12, true),
      ebx: dv.getUint32(o + 16, true),
      ecx: dv.getUint32(o + 20, true),
      edx: dv.getUint32(o + 24, true),
    });
  }
  return out;
}

/** The KVM system fd. */
export class Kvm {
  /** The open /dev/kvm descriptor. */
  readonly fd: number;

  private constructor(fd: number) {
    this.fd = fd;
  }

  /** Opens /dev/kvm; the error says why a user cannot use it. */
  static open(path = "/dev/kvm"): Kvm {
    let fd: number;
    try {
      fd = sysOpen(path, 2 | 0o2000000); // O_RDWR | O_CLOEXEC
    } catch (e) {
      const code = (e as SysError).errno;
      if (code === 2) throw new Deno.errors.NotFound(`KVM is not available: ${path} does not exist`);
      if (code === 13 || code === 1) {
        throw new Deno.errors.PermissionDenied(
          `Cannot open ${path}: permission denied (run as root or join the kvm group)`,
        );
      }
      throw e;
    }
    const kvm = new Kvm(fd);
    const v = ioctlVal(fd, KVM.GET_API_VERSION, 0n, "KVM_GET_API_VERSION");
    if (v !== 12) {
      sysClose(fd);
      throw new Error(`${path} speaks KVM API version ${v}; version 12 is required`);
    }
    return kvm;
  }

  /** KVM_CHECK_EXTENSION. */
  checkExtension(cap: number): number {
    return ioctlVal(this.fd, KVM.CHECK_EXTENSION, BigInt(cap), "KVM_CHECK_EXTENSION");
  }

  /** The most vCPUs a VM may have. */
  maxVcpus(): number {
    return this.checkExtension(CAP.MAX_VCPUS) || this.checkExtension(CAP.NR_VCPUS) || 4;
  }

  /** Size of the kvm_run mapping of a vCPU fd. */
  vcpuMmapSize(): number {
    return ioctlVal(this.fd, KVM.GET_VCPU_MMAP_SIZE, 0n, "KVM_GET_VCPU_MMAP_SIZE");
  }

  /** KVM_GET_SUPPORTED_CPUID. */
  supportedCpuid(): CpuidEntry[] {
    const buf = encodeCpuid(
      new Array(256).fill({ fn: 0, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0 }),
    );
    ioctlBuf(this.fd, KVM.GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID");
    return decodeCpuid(buf);
  }

  /** KVM_CREATE_VM; returns the VM fd. */
  createVm(): number {
    return ioctlVal(this.fd, KVM.CREATE_VM, 0n, "KVM_CREATE_VM");
  }

  /** Closes /dev/kvm. */
  close(): void {
    sysClose(this.fd);
  }
}
