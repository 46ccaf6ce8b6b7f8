/**
 * vCPU threads as seen from the device thread: one Worker per vCPU running KVM_RUN,
 * a mailbox per vCPU answered here from the port-I/O and MMIO buses, and stop/kick.
 */

import type { Bus } from "./bus.ts";
import { calibrate, pollWhile, PollWindow } from "./poll.ts";
import { installNoopSignalHandler, sysGetAffinity, sysSetAffinity, sysTgkill } from "./sys/libc.ts";
import {
  CTL,
  KIND_PIO,
  MB,
  MB_IDLE,
  MB_REQUEST,
  MB_RESPONSE,
  type VcpuCodeAt,
  type VcpuExitReport,
  type VcpuInit,
  type VcpuMessage,
} from "./vcpu_protocol.ts";

const KICK_SIGNAL = 12; // SIGUSR2
/**
 * The most the main thread polls a mailbox for the next exit before sleeping (us). The
 * window itself adapts between 0 and this (vmm/poll.ts).
 */
const SPIN_MAX_US = Number(Deno.env.get("TSVMM_SPIN_US") ?? "100");

/** Per-vCPU start parameters (the mailbox and control block are made here). */
export type VcpuStart = Omit<VcpuInit, "mailbox" | "control" | "bell">;

interface Thread {
  worker: Worker;
  mb: Int32Array;
  ctl: Int32Array;
  tid?: number;
  done: boolean;
  /** Its exit waits for a device's promise. */
  busy: boolean;
  /** Views of the mailbox data, one per access width, made once: the exit path allocates nothing. */
  views: Uint8Array[];
  onDiag?: (text: string, at?: VcpuCodeAt) => void;
}

let leftRunning = 0;

/**
 * Pinning across the VMs of one process (a script may run several): the vCPU threads of every
 * running VM, so pinning one VM never moves another's vCPUs; how many pinned VMs are running;
 * and the CPUs the process could use before the first of them pinned, which every thread gets
 * back when the last one ends (and an unpinned VM's vCPUs get at once: a thread inherits the
 * pinned main thread's single CPU).
 */
const pinning = { vcpuTids: new Set<number>(), pinnedVms: 0, allowed: undefined as number[] | undefined };

/**
 * How many vCPU threads of this process did not leave KVM_RUN within 2 s of their VM's stop
 * and were abandoned (their Workers terminated while the thread may still sit in the ioctl).
 * Nonzero means a guest vCPU ignores the kick signal: under an emulated or broken host CPU such
 * a thread can hold a host CPU, so a harness running many VMs in one process checks this after
 * each VM and starts a fresh process (or host) when it grows.
 */
export function vcpuThreadsLeftRunning(): number {
  return leftRunning;
}

/** Thread IDs of this process. */
function processThreads(): number[] {
  return [...Deno.readDirSync("/proc/self/task")].map((e) => Number(e.name));
}

/** The set of vCPU threads of one VM. */
export class VcpuThreads {
  private threads: Thread[] = [];
  private stopping = false;
  /** This VM pinned its threads (and counts in `pinning.pinnedVms` until it stops). */
  private pinned = false;
  private readonly exited: Promise<void>;
  private resolveExited!: () => void;
  /** Rung by a vCPU after it posts an exit (and by `finish`): what the answering loop waits on. */
  private readonly bell = new Int32Array(new SharedArrayBuffer(4));
  /** Exits handled, per kind, for diagnostics. */
  exits = 0;

  /** Threads that answer from `pio` and `mmio` and report each vCPU's stop to `onExit`. */
  constructor(
    private readonly pio: Bus,
    private readonly mmio: Bus,
    private readonly onExit: (r: VcpuExitReport) => void,
    private readonly pinVcpus = false,
  ) {
    this.exited = new Promise((r) => this.resolveExited = r);
  }

  /** The vCPU threads' host thread IDs, in vCPU order (empty before they are set up). */
  get tids(): number[] {
    return this.threads.flatMap((t) => t.tid === undefined ? [] : [t.tid]);
  }

  /** Creates the vCPUs in their threads, waits until all are set up, then lets them run. */
  async start(starts: VcpuStart[]): Promise<void> {
    installNoopSignalHandler(KICK_SIGNAL);
    const ready: Promise<void>[] = [];
    for (const s of starts) {
      const mailbox = new SharedArrayBuffer(MB.bytes);
      const control = new SharedArrayBuffer(CTL.bytes);
      const mb = new Int32Array(mailbox);
      mb[MB.state] = -1; // held until every vCPU is ready
      const worker = new Worker(new URL("./vcpu_worker.ts", import.meta.url).href, { type: "module" });
      const t: Thread = {
        worker,
        mb,
        ctl: new Int32Array(control),
        done: false,
        busy: false,
        views: [0, 1, 2, 3, 4, 5, 6, 7, 8].map((n) => new Uint8Array(mailbox, MB.dataByte, n)),
      };
      this.threads.push(t);
      ready.push(
        new Promise<void>((resolve, reject) => {
          worker.onmessage = (ev: MessageEvent<VcpuMessage>) => {
            const m = ev.data;
            if (m.type === "ready") {
              t.tid = m.tid;
              resolve();
            } else if (m.type === "exit") {
              this.finish(t, m.report);
              reject(new Error(`vCPU ${s.index}: ${m.report.detail}`));
            }
          };
          worker.onerror = (e) => {
            e.preventDefault();
            this.finish(t, { index: s.index, reason: "error", detail: e.message });
            reject(new Error(`vCPU ${s.index}: ${e.message}`));
          };
        }),
      );
      worker.postMessage(
        { ...s, mailbox, control, bell: this.bell.buffer as SharedArrayBuffer } satisfies VcpuInit,
      );
    }
    try {
      await Promise.all(ready);
    } catch (e) {
      await this.stop();
      throw e;
    }
    for (const t of this.threads) pinning.vcpuTids.add(t.tid!);
    if (this.pinVcpus) this.pin();
    else if (pinning.allowed) {
      for (const t of this.threads) {
        try {
          sysSetAffinity(t.tid!, pinning.allowed);
        } catch { /* the thread ended meanwhile */ }
      }
    }
    calibrate(); // measured now, not in the guest's first exit
    for (const t of this.threads) {
      t.worker.onmessage = (ev: MessageEvent<VcpuMessage>) => {
        if (ev.data.type === "exit") this.finish(t, ev.data.report);
        else if (ev.data.type === "diag") t.onDiag?.(ev.data.text, ev.data.at);
      };
      Atomics.store(t.mb, MB.state, MB_IDLE);
      Atomics.notify(t.mb, MB.state);
    }
    this.serve();
  }

  /**
   * Of the CPUs this process may use, the first is left to the VMM's threads and vCPU i
   * runs on the (i mod (n - 1))-th of the others. Undone when the vCPUs stop.
   */
  private pin(): void {
    const allowed = pinning.allowed ?? sysGetAffinity();
    if (allowed.length < 2) return; // refused at config time; nothing to split here
    pinning.allowed = allowed;
    pinning.pinnedVms++;
    this.pinned = true;
    const [vmm, ...rest] = allowed;
    for (const tid of processThreads()) {
      if (pinning.vcpuTids.has(tid)) continue; // this VM's, placed below; another VM's, left alone
      try {
        sysSetAffinity(tid, [vmm]);
      } catch { /* the thread ended meanwhile */ }
    }
    this.threads.forEach((t, i) => sysSetAffinity(t.tid!, [rest[i % rest.length]]));
  }

  /**
   * Forgets this VM's vCPU threads; after the last pinned VM of the process, lets every thread
   * run anywhere again (while another pinned VM runs, the shared threads stay where they are).
   */
  private unpin(): void {
    for (const t of this.threads) if (t.tid !== undefined) pinning.vcpuTids.delete(t.tid);
    if (!this.pinned) return;
    this.pinned = false;
    if (--pinning.pinnedVms > 0) return;
    const all = pinning.allowed!;
    pinning.allowed = undefined;
    for (const tid of processThreads()) {
      try {
        sysSetAffinity(tid, all);
      } catch { /* the thread ended meanwhile */ }
    }
  }

  /** Wakes the answering loop. */
  private ring(): void {
    Atomics.add(this.bell, 0, 1);
    Atomics.notify(this.bell, 0);
  }

  private finish(t: Thread, r: VcpuExitReport): void {
    if (t.done) return;
    t.done = true;
    t.worker.terminate();
    this.ring(); // the answering loop sees `done`
    if (r.reason !== "stopped") this.onExit(r);
    if (this.threads.every((x) => x.done)) this.resolveExited();
  }

  /** A device model fault is a VMM bug: end the VM with a report, never hang the vCPU. */
  private deviceFault(mb: Int32Array, addr: number, d: Uint8Array, e: unknown): void {
    d.fill(0xff);
    const kind = mb[MB.kind] === KIND_PIO ? "port" : "MMIO";
    this.onExit({
      index: -1,
      reason: "error",
      detail: `device fault at ${kind} 0x${addr.toString(16)}: ${(e as Error).message}`,
    });
  }

  /** Takes the exit waiting in `t`'s mailbox and answers it (later, if the device must wait). */
  private answer(t: Thread): void {
    const mb = t.mb;
    this.exits++;
    const size = mb[MB.size];
    const addr = (mb[MB.addrLo] >>> 0) + (mb[MB.addrHi] >>> 0) * 0x1_0000_0000;
    const bus = mb[MB.kind] === KIND_PIO ? this.pio : this.mmio;
    const d = t.views[size] ?? t.views[8];
    let later: void | Promise<void> = undefined;
    try {
      if (mb[MB.isWrite]) later = bus.write(addr, d);
      else bus.read(addr, d);
    } catch (e) {
      this.deviceFault(mb, addr, d, e);
    }
    const respond = () => {
      Atomics.store(mb, MB.state, MB_RESPONSE);
      Atomics.notify(mb, MB.state);
    };
    if (!(later instanceof Promise)) return respond();
    // A write the device may not answer yet (a virtio reset draining in-flight I/O): this
    // vCPU stays in its exit until the device is done; the others go on being answered.
    t.busy = true;
    later.catch((e) => this.deviceFault(mb, addr, d, e)).then(() => {
      t.busy = false;
      respond();
    });
  }

  /**
   * Answers every vCPU's mailbox until all have stopped. One loop serves them all, so
   * polling for one vCPU's next exit never holds up another's.
   */
  private async serve(): Promise<void> {
    const bell = this.bell;
    const window = new PollWindow(SPIN_MAX_US, Math.min(50, SPIN_MAX_US));
    while (!this.threads.every((t) => t.done)) {
      const rung = Atomics.load(bell, 0);
      let answered = false;
      for (const t of this.threads) {
        if (t.done || t.busy || Atomics.load(t.mb, MB.state) !== MB_REQUEST) continue;
        this.answer(t);
        answered = true;
      }
      if (answered) continue;
      // Exits come in bursts: poll (within a bounded window that follows how soon the next
      // exit has been coming) before paying for an event-loop wake-up.
      if (!pollWhile(bell, 0, rung, window)) {
        const since = performance.now();
        const w = Atomics.waitAsync(bell, 0, rung);
        if (w.async) await w.value;
        window.slept((performance.now() - since) * 1000);
      }
    }
  }

  /**
   * Each running vCPU's state, one line each (vmm/arch/x86_64/diag.ts): the vCPU is kicked
   * out of KVM_RUN, reports, and runs on. A vCPU that does not come out within `timeoutMs`
   * is reported as such (stuck inside KVM_RUN).
   */
  async diagnose(timeoutMs = 1000): Promise<Array<{ text: string; at?: VcpuCodeAt }>> {
    const live = this.threads.map((t, i) => ({ t, i })).filter(({ t }) => !t.done && t.tid);
    const lines = await Promise.all(
      live.map(({ t, i }) =>
        new Promise<{ text: string; at?: VcpuCodeAt }>((resolve) => {
          const kick = setInterval(() => sysTgkill(t.tid!, KICK_SIGNAL), 20);
          const give = setTimeout(
            () => finish(`vCPU ${i}: no answer to a kick within ${timeoutMs} ms`),
            timeoutMs,
          );
          const finish = (text: string, at?: VcpuCodeAt) => {
            clearInterval(kick);
            clearTimeout(give);
            t.onDiag = undefined;
            Atomics.store(t.ctl, CTL.diagnose, 0);
            resolve({ text, at });
          };
          t.onDiag = finish;
          Atomics.store(t.ctl, CTL.diagnose, 1);
          sysTgkill(t.tid!, KICK_SIGNAL);
        })
      ),
    );
    return lines;
  }

  /** Stops every vCPU: sets the stop flags and kicks threads out of KVM_RUN. */
  async stop(): Promise<void> {
    if (!this.stopping) {
      this.stopping = true;
      for (const t of this.threads) Atomics.store(t.ctl, CTL.stop, 1);
    }
    const kick = () => {
      for (const t of this.threads) if (!t.done && t.tid) sysTgkill(t.tid, KICK_SIGNAL);
    };
    kick();
    const timer = setInterval(kick, 20);
    let deadlineTimer: ReturnType<typeof setTimeout> | undefined;
    const deadline = new Promise<void>((r) => deadlineTimer = setTimeout(r, 2000));
    await Promise.race([this.exited, deadline]);
    clearInterval(timer);
    clearTimeout(deadlineTimer);
    for (const t of this.threads) {
      if (t.done) continue;
      leftRunning++;
      this.finish(t, { index: -1, reason: "stopped", detail: "terminated" });
    }
    this.unpin();
  }
}
