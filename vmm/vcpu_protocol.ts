/**
 * The shared-memory handoff between a vCPU thread and the device thread.
 * A vCPU exit that needs a device (port I/O, MMIO) is written into the mailbox;
 * the device thread answers in place. Waiting uses Atomics on the state word.
 */

import type { EntryState } from "./arch/x86_64/regs.ts";

/** Int32 indexes in the mailbox. */
export const MB = {
  state: 0,
  kind: 1,
  isWrite: 2,
  size: 3,
  addrLo: 4,
  addrHi: 5,
  /** Byte offset of the 8 data bytes. */
  dataByte: 24,
  /** Mailbox size in bytes. */
  bytes: 32,
} as const;

/** Mailbox states. */
export const MB_IDLE = 0;
/** The vCPU posted a request. */
export const MB_REQUEST = 1;
/** The device thread answered. */
export const MB_RESPONSE = 2;

/** Access kinds. */
export const KIND_PIO = 0;
/** MMIO access. */
export const KIND_MMIO = 1;

/** Int32 indexes in the control block: stop the vCPU; report its state once (then go on). */
export const CTL = { stop: 0, diagnose: 1, bytes: 16 } as const;

/** What the device thread sends a vCPU thread to start it. */
export interface VcpuInit {
  /** VM fd (process-wide). */
  vmFd: number;
  /** vCPU index = APIC ID. */
  index: number;
  /** kvm_run mapping size. */
  runSize: number;
  /** Encoded struct kvm_cpuid2 for this vCPU. */
  cpuid: Uint8Array;
  /** Boot MSRs. */
  msrs: Array<[number, bigint]>;
  /** Initial register state (boot vCPU), or null (APs wait for INIT/SIPI). */
  entry: EntryState | null;
  /** The exit mailbox. */
  mailbox: SharedArrayBuffer;
  /** The control block (stop flag). */
  control: SharedArrayBuffer;
  /** One Int32 shared by every vCPU of the VM: added to and notified after each posted exit. */
  bell: SharedArrayBuffer;
  /** Registers this thread answers itself (vmm/shared_regs.ts). */
  sharedRegs: SharedArrayBuffer;
}

/** Why a vCPU stopped. */
export interface VcpuExitReport {
  /** vCPU index. */
  index: number;
  /** Category of the stop. */
  reason:
    | "stopped"
    | "shutdown"
    | "reset"
    | "poweroff"
    | "crash"
    | "internal-error"
    | "fail-entry"
    | "unexpected-exit"
    | "error";
  /** One-line detail. */
  detail: string;
  /** Guest RIP at the stop, if read. */
  rip?: bigint;
  /** CR0/CR3/CR4/EFER for translating RIP. */
  cr0?: bigint;
  /** Page table root. */
  cr3?: bigint;
  /** CR4. */
  cr4?: bigint;
  /** EFER. */
  efer?: bigint;
  /** CS base (for non-paged modes). */
  csBase?: bigint;
  /** Instruction bytes KVM reported, if any. */
  insn?: number[];
}

/** Messages from a vCPU thread. */
export type VcpuMessage =
  | { type: "ready"; index: number; tid: number; fd: number }
  | { type: "exit"; report: VcpuExitReport }
  | { type: "diag"; index: number; text: string; at?: VcpuCodeAt };

/** What locating a vCPU's code needs: RIP and the paging registers. */
export interface VcpuCodeAt {
  /** RIP. */
  rip: bigint;
  /** CR0 (paging on or off). */
  cr0: bigint;
  /** Page table root. */
  cr3: bigint;
  /** CS base (for non-paged modes). */
  csBase: bigint;
}
