/** Typed wrapper for a KVM vCPU fd and its kvm_run mapping. Used on the vCPU's own thread. */

import { ioctlBuf, ioctlVal } from "./kvm.ts";
import { errno, libc, mmapShared, sysClose, SysError, sysMunmap } from "./sys/libc.ts";
import { KVM, SIZE } from "./sys/kvm_abi.ts";

/** LAPIC register offsets and delivery modes used at boot. */
const APIC_LVT_LINT0 = 0x350;
const APIC_LVT_LINT1 = 0x360;
const APIC_MODE_NMI = 4;
const APIC_MODE_EXTINT = 7;

/** What KVM_RUN returned. */
export type RunResult = "exit" | "interrupted";

/** A vCPU fd with its kvm_run page. */
export class VcpuFd {
  /** The vCPU descriptor. */
  readonly fd: number;
  /** The kvm_run page, as bytes. */
  readonly run: Uint8Array;
  /** The kvm_run page, as a DataView. */
  readonly runView: DataView;
  private readonly runPtr: Deno.PointerObject;
  private readonly runSize: number;
  private readonly runFn: (fd: number, req: bigint, arg: bigint) => number;

  /** KVM_CREATE_VCPU on `vmFd` with id `index`, and maps its kvm_run. */
  constructor(vmFd: number, index: number, runSize: number) {
    this.fd = ioctlVal(vmFd, KVM.CREATE_VCPU, BigInt(index), "KVM_CREATE_VCPU");
    this.runSize = runSize;
    this.runPtr = mmapShared(this.fd, runSize);
    const ab = Deno.UnsafePointerView.getArrayBuffer(this.runPtr, runSize);
    this.run = new Uint8Array(ab);
    this.runView = new DataView(ab);
    this.runFn = libc().ioctl_val;
  }

  /** KVM_RUN. "interrupted" when a signal or immediate_exit cut it short. */
  runOnce(): RunResult {
    const r = this.runFn(this.fd, KVM.RUN, 0n);
    if (r < 0) {
      const e = errno();
      if (e === 4 || e === 11) return "interrupted"; // EINTR, EAGAIN
      throw new SysError("KVM_RUN", e);
    }
    return "exit";
  }

  /** KVM_GET_REGS. */
  getRegs(): Uint8Array {
    const b = new Uint8Array(SIZE.regs);
    ioctlBuf(this.fd, KVM.GET_REGS, b, "KVM_GET_REGS");
    return b;
  }

  /** KVM_SET_REGS. */
  setRegs(b: Uint8Array): void {
    ioctlBuf(this.fd, KVM.SET_REGS, b, "KVM_SET_REGS");
  }

  /** KVM_GET_SREGS. */
  getSregs(): Uint8Array {
    const b = new Uint8Array(SIZE.sregs);
    ioctlBuf(this.fd, KVM.GET_SREGS, b, "KVM_GET_SREGS");
    return b;
  }

  /** KVM_SET_SREGS. */
  setSregs(b: Uint8Array): void {
    ioctlBuf(this.fd, KVM.SET_SREGS, b, "KVM_SET_SREGS");
  }

  /** KVM_SET_CPUID2 with an encoded struct kvm_cpuid2. */
  setCpuid(encoded: Uint8Array): void {
    ioctlBuf(this.fd, KVM.SET_CPUID2, encoded, "KVM_SET_CPUID2");
  }

  /** KVM_SET_MSRS; throws naming the first MSR KVM refused. */
  setMsrs(msrs: ReadonlyArray<readonly [number, bigint]>): void {
    const b = new Uint8Array(8 + msrs.length * SIZE.msrEntry);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, msrs.length, true);
    msrs.forEach(([idx, val], i) => {
      dv.setUint32(8 + i * 16, idx, true);
      dv.setBigUint64(16 + i * 16, val, true);
    });
    const n = ioctlBuf(this.fd, KVM.SET_MSRS, b, "KVM_SET_MSRS");
    if (n !== msrs.length) {
      throw new Error(`KVM_SET_MSRS refused MSR 0x${msrs[n][0].toString(16)}`);
    }
  }

  /** Sets the x87 control word and MXCSR to their reset values. */
  setBootFpu(): void {
    const b = new Uint8Array(SIZE.fpu);
    const dv = new DataView(b.buffer);
    dv.setUint16(128, 0x37f, true); // fcw
    dv.setUint32(408, 0x1f80, true); // mxcsr
    ioctlBuf(this.fd, KVM.SET_FPU, b, "KVM_SET_FPU");
  }

  /** LAPIC LINT0 as ExtINT (the PIC) and LINT1 as NMI. */
  setBootLapic(): void {
    const b = new Uint8Array(SIZE.lapic);
    ioctlBuf(this.fd, KVM.GET_LAPIC, b, "KVM_GET_LAPIC");
    const dv = new DataView(b.buffer);
    const mode = (off: number, m: number) =>
      dv.setUint32(off, ((dv.getUint32(off, true) & ~0x700) | (m << 8)) >>> 0, true);
    mode(APIC_LVT_LINT0, APIC_MODE_EXTINT);
    mode(APIC_LVT_LINT1, APIC_MODE_NMI);
    ioctlBuf(this.fd, KVM.SET_LAPIC, b, "KVM_SET_LAPIC");
  }

  /** KVM_GET_LAPIC: the 1 KiB register page. */
  getLapic(): Uint8Array {
    const b = new Uint8Array(SIZE.lapic);
    ioctlBuf(this.fd, KVM.GET_LAPIC, b, "KVM_GET_LAPIC");
    return b;
  }

  /** KVM_GET_MP_STATE (0 runnable, 1 uninitialized, 2 INIT received, 3 halted, 4 SIPI received). */
  getMpState(): number {
    const b = new Uint8Array(4);
    ioctlBuf(this.fd, KVM.GET_MP_STATE, b, "KVM_GET_MP_STATE");
    return new DataView(b.buffer).getUint32(0, true);
  }

  /** KVM_GET_VCPU_EVENTS: struct kvm_vcpu_events. */
  getEvents(): Uint8Array {
    const b = new Uint8Array(SIZE.vcpuEvents);
    ioctlBuf(this.fd, KVM.GET_VCPU_EVENTS, b, "KVM_GET_VCPU_EVENTS");
    return b;
  }

  /** Unmaps kvm_run and closes the fd. */
  close(): void {
    sysMunmap(this.runPtr, this.runSize);
    sysClose(this.fd);
  }
}
