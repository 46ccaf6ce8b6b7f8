/**
 * A vCPU thread: creates its vCPU, sets the boot state, and runs KVM_RUN synchronously.
 * Port I/O and MMIO exits go to the main thread through the shared mailbox, except the
 * registers it answers itself (vmm/shared_regs.ts).
 */

/// <reference lib="deno.worker" />

import { VcpuFd } from "./vcpu.ts";
import { applyBootSregs, bootRegs } from "./arch/x86_64/regs.ts";
import { EXIT, EXIT_NAMES, REGS, RUN, SREGS, SYSTEM_EVENT } from "./sys/kvm_abi.ts";
import { sysGettid } from "./sys/libc.ts";
import { sharedAccess } from "./shared_regs.ts";
import { calibrate, pollWhile, PollWindow } from "./poll.ts";
import { describeVcpu } from "./arch/x86_64/diag.ts";
import {
  CTL,
  KIND_MMIO,
  KIND_PIO,
  MB,
  MB_REQUEST,
  type VcpuExitReport,
  type VcpuInit,
  type VcpuMessage,
} from "./vcpu_protocol.ts";

const INTERNAL_ERROR_EMULATION = 1;
/**
 * The most a vCPU polls for the main thread's answer before sleeping (us). This thread has
 * nothing else to do meanwhile; the bound keeps a slow answer (a reset draining I/O) from
 * costing a core.
 */
const ANSWER_POLL_MAX_US = Number(Deno.env.get("TSVMM_ANSWER_SPIN_US") ?? "50");
const EMULATION_FLAG_INSN_BYTES = 1n;

function post(m: VcpuMessage): void {
  self.postMessage(m);
}

/** The registers reports need: RIP, RFLAGS, and what translating RIP takes. Throws if unreadable. */
function cpuState(vcpu: VcpuFd) {
  const regs = new DataView(vcpu.getRegs().buffer);
  const s = new DataView(vcpu.getSregs().buffer);
  return {
    rip: regs.getBigUint64(REGS.rip, true),
    rflags: regs.getBigUint64(REGS.rflags, true),
    cr0: s.getBigUint64(SREGS.cr0, true),
    cr3: s.getBigUint64(SREGS.cr3, true),
    cr4: s.getBigUint64(SREGS.cr4, true),
    efer: s.getBigUint64(SREGS.efer, true),
    csBase: s.getBigUint64(SREGS.cs, true),
  };
}

function stateOf(
  vcpu: VcpuFd,
  index: number,
  reason: VcpuExitReport["reason"],
  detail: string,
): VcpuExitReport {
  const r: VcpuExitReport = { index, reason, detail };
  try {
    const { rflags: _, ...st } = cpuState(vcpu);
    Object.assign(r, st);
  } catch {
    // registers unreadable: the report goes without them
  }
  return r;
}

function diagnosis(vcpu: VcpuFd, index: number): VcpuMessage {
  try {
    const at = cpuState(vcpu);
    const text = describeVcpu(index, {
      ...at,
      mpState: vcpu.getMpState(),
      lapic: vcpu.getLapic(),
      events: vcpu.getEvents(),
    });
    return { type: "diag", index, text, at };
  } catch (e) {
    return { type: "diag", index, text: `vCPU ${index}: state unreadable: ${(e as Error).message}` };
  }
}

function runLoop(init: VcpuInit, vcpu: VcpuFd): VcpuExitReport {
  const mb = new Int32Array(init.mailbox);
  const mbBytes = new Uint8Array(init.mailbox);
  const ctl = new Int32Array(init.control);
  const shared = new Int32Array(init.sharedRegs);
  const bell = new Int32Array(init.bell);
  const run = vcpu.run;
  const rv = vcpu.runView;
  const answer = new PollWindow(ANSWER_POLL_MAX_US, 20);
  // The exit path allocates nothing: the views of the run mapping's data are made once.
  const mmioData = run.subarray(RUN.mmioData, RUN.mmioData + 8);
  const ioViews = new Map<number, Uint8Array>();
  const ioData = (at: number): Uint8Array => {
    let v = ioViews.get(at);
    if (!v) ioViews.set(at, v = run.subarray(at, at + 8));
    return v;
  };

  // One device access through the mailbox; returns when the device thread has answered.
  const access = (kind: number, isWrite: boolean, addr: number, size: number, data: Uint8Array): void => {
    mb[MB.kind] = kind;
    mb[MB.isWrite] = isWrite ? 1 : 0;
    mb[MB.size] = size;
    mb[MB.addrLo] = addr | 0;
    mb[MB.addrHi] = Math.floor(addr / 0x1_0000_0000);
    if (isWrite) { for (let i = 0; i < size; i++) mbBytes[MB.dataByte + i] = data[i]; }
    Atomics.store(mb, MB.state, MB_REQUEST);
    Atomics.add(bell, 0, 1);
    Atomics.notify(bell, 0);
    // A register answer usually comes soon: poll (within a bounded window that follows how
    // long answers have been taking) before sleeping on the futex.
    if (!pollWhile(mb, MB.state, MB_REQUEST, answer)) {
      const since = performance.now();
      while (Atomics.load(mb, MB.state) === MB_REQUEST) Atomics.wait(mb, MB.state, MB_REQUEST, 100);
      answer.slept((performance.now() - since) * 1000);
    }
    if (!isWrite) { for (let i = 0; i < size; i++) data[i] = mbBytes[MB.dataByte + i]; }
  };

  for (;;) {
    if (Atomics.load(ctl, CTL.stop)) return { index: init.index, reason: "stopped", detail: "stopped" };
    if (vcpu.runOnce() === "interrupted") {
      run[RUN.immediateExit] = 0;
      if (Atomics.compareExchange(ctl, CTL.diagnose, 1, 0) === 1) post(diagnosis(vcpu, init.index));
      continue;
    }
    const reason = rv.getUint32(RUN.exitReason, true);
    switch (reason) {
      case EXIT.IO: {
        const out = run[RUN.ioDirection] === 1;
        const size = run[RUN.ioSize];
        const port = rv.getUint16(RUN.ioPort, true);
        const count = rv.getUint32(RUN.ioCount, true);
        // KVM puts the data within the run mapping, at an offset under 4 GiB.
        const off = rv.getUint32(RUN.ioDataOffset, true);
        if (count === 1 && sharedAccess(shared, port, out, size, ioData(off), true)) break;
        for (let i = 0; i < count; i++) access(KIND_PIO, out, port, size, ioData(off + i * size));
        break;
      }
      case EXIT.MMIO: {
        const addr = rv.getUint32(RUN.mmioPhysAddr, true) +
          rv.getUint32(RUN.mmioPhysAddr + 4, true) * 0x1_0000_0000;
        const len = Math.min(rv.getUint32(RUN.mmioLen, true), 8);
        const isWrite = run[RUN.mmioIsWrite] === 1;
        if (!sharedAccess(shared, addr, isWrite, len, mmioData)) {
          access(KIND_MMIO, isWrite, addr, len, mmioData);
        }
        break;
      }
      case EXIT.HLT:
        // Only without an in-kernel LAPIC; nothing will wake this vCPU.
        return stateOf(vcpu, init.index, "unexpected-exit", "guest halted with interrupts off");
      case EXIT.SHUTDOWN:
        return stateOf(vcpu, init.index, "shutdown", "triple fault (KVM_EXIT_SHUTDOWN)");
      case EXIT.SYSTEM_EVENT: {
        const t = rv.getUint32(RUN.systemEventType, true);
        if (t === SYSTEM_EVENT.SHUTDOWN) {
          return { index: init.index, reason: "poweroff", detail: "system event shutdown" };
        }
        if (t === SYSTEM_EVENT.RESET) {
          return { index: init.index, reason: "reset", detail: "system event reset" };
        }
        return stateOf(vcpu, init.index, "crash", `system event ${t}`);
      }
      case EXIT.INTERNAL_ERROR: {
        const sub = rv.getUint32(RUN.internalSuberror, true);
        const ndata = rv.getUint32(RUN.internalNdata, true);
        const r = stateOf(
          vcpu,
          init.index,
          "internal-error",
          sub === INTERNAL_ERROR_EMULATION
            ? "KVM internal error: emulation failure"
            : `KVM internal error, suberror ${sub}`,
        );
        if (sub === INTERNAL_ERROR_EMULATION && ndata >= 2) {
          const flags = rv.getBigUint64(RUN.internalData, true);
          if (flags & EMULATION_FLAG_INSN_BYTES) {
            // struct emulation_failure: flags u64, then insn_size u8 and insn_bytes[15].
            const n = Math.min(run[RUN.internalData + 8], 15);
            if (n > 0) r.insn = Array.from(run.subarray(RUN.internalData + 9, RUN.internalData + 9 + n));
          }
        }
        return r;
      }
      case EXIT.FAIL_ENTRY: {
        const hw = rv.getBigUint64(RUN.failReason, true);
        return stateOf(
          vcpu,
          init.index,
          "fail-entry",
          `VM entry failed, hardware reason 0x${hw.toString(16)}`,
        );
      }
      case EXIT.INTR:
        if (Atomics.compareExchange(ctl, CTL.diagnose, 1, 0) === 1) post(diagnosis(vcpu, init.index));
        break;
      default:
        return stateOf(
          vcpu,
          init.index,
          "unexpected-exit",
          `unexpected exit ${EXIT_NAMES[reason] ?? reason}`,
        );
    }
  }
}

self.onmessage = (ev: MessageEvent<VcpuInit>) => {
  const init = ev.data;
  let vcpu: VcpuFd;
  try {
    vcpu = new VcpuFd(init.vmFd, init.index, init.runSize);
    vcpu.setCpuid(init.cpuid);
    if (init.entry) {
      const sregs = vcpu.getSregs();
      applyBootSregs(sregs, init.entry.mode);
      vcpu.setSregs(sregs);
      vcpu.setRegs(bootRegs(init.entry));
      vcpu.setBootFpu();
    }
    vcpu.setMsrs(init.msrs);
    vcpu.setBootLapic();
  } catch (e) {
    post({ type: "exit", report: { index: init.index, reason: "error", detail: (e as Error).message } });
    return;
  }
  calibrate(); // measured now, not in the guest's first exit
  post({ type: "ready", index: init.index, tid: sysGettid(), fd: vcpu.fd });
  // Wait for the go signal: the device thread clears mailbox state to idle when all are ready.
  const mb = new Int32Array(init.mailbox);
  Atomics.wait(mb, MB.state, -1);
  let report: VcpuExitReport;
  try {
    report = runLoop(init, vcpu);
  } catch (e) {
    report = { index: init.index, reason: "error", detail: (e as Error).message };
  }
  // The vCPU fd holds a reference to the VM: close it so the VM goes when the VMM lets go.
  vcpu.close();
  post({ type: "exit", report });
};
