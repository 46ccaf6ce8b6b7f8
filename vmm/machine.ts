/** A running VM: its vCPU threads, devices, console and exit. */

import type { Bus } from "./bus.ts";
import type { GuestMemory } from "./memory.ts";
import type { ConsoleHub } from "./console.ts";
import { type VcpuStart, VcpuThreads } from "./vcpus.ts";
import type { VcpuExitReport } from "./vcpu_protocol.ts";
import { describeWalk, readInstructionBytes } from "./arch/x86_64/pagewalk.ts";

/** How a VM ended. */
export interface VmExit {
  /** Process exit code the CLI uses: 0 for a guest power-off or reset, 1 for a failure. */
  code: number;
  /** Category. */
  reason:
    | "poweroff"
    | "reset"
    | "triple-fault"
    | "internal-error"
    | "entry-failure"
    | "crash"
    | "unexpected-exit"
    | "error"
    | "stopped";
  /** One line for a human. */
  message: string;
}

/** Host-side services started with the VM and released when it ends. */
export interface Teardown {
  /** Starts host-side services (the event loop). */
  start(): void;
  /** Stops them and releases KVM fds, devices and guest memory. */
  release(): Promise<void>;
}

function hex(v: bigint | number): string {
  return "0x" + v.toString(16);
}

/** Bytes as "0f 01 d9". */
function hexBytes(b: number[]): string {
  return b.map((x) => x.toString(16).padStart(2, "0")).join(" ");
}

/** Turns a vCPU's stop report into the VM's exit. */
export function describeExit(r: VcpuExitReport, mem: GuestMemory): VmExit {
  const where = r.rip === undefined ? "" : ` at RIP ${hex(r.rip)}`;
  let insn = r.insn;
  if ((!insn || insn.length === 0) && r.rip !== undefined && r.cr0 !== undefined && r.cr3 !== undefined) {
    insn = readInstructionBytes(mem, { rip: r.rip, cr0: r.cr0, cr3: r.cr3, csBase: r.csBase });
  }
  const bytes = insn && insn.length ? `, instruction bytes: ${hexBytes(insn)}` : "";
  const cpu = r.index >= 0 ? `vCPU ${r.index}: ` : "";
  switch (r.reason) {
    case "poweroff":
      return { code: 0, reason: "poweroff", message: "guest powered off" };
    case "reset":
      return { code: 0, reason: "reset", message: "guest reset" };
    case "shutdown":
      return {
        code: 1,
        reason: "triple-fault",
        message: `${cpu}guest triple fault (KVM_EXIT_SHUTDOWN)${where}${bytes}`,
      };
    case "internal-error":
      return { code: 1, reason: "internal-error", message: `${cpu}${r.detail}${where}${bytes}` };
    case "fail-entry":
      return { code: 1, reason: "entry-failure", message: `${cpu}${r.detail}${where}` };
    case "crash":
      return { code: 1, reason: "crash", message: `${cpu}guest crashed (${r.detail})${where}` };
    case "unexpected-exit":
      return { code: 1, reason: "unexpected-exit", message: `${cpu}${r.detail}${where}${bytes}` };
    case "stopped":
      return { code: 0, reason: "stopped", message: "stopped by the host" };
    default:
      return { code: 1, reason: "error", message: `${cpu}${r.detail}` };
  }
}

/** What a machine reports about itself, and how its vCPUs are placed. */
export interface MachineOptions {
  /** One line per device (failure reports). */
  describeDevices?: () => string[];
  /** Brings what describeDevices reports up to date (the device thread's part is asked for). */
  refreshDevices?: () => Promise<void>;
  /** The interrupt controller's state (hung-guest reports). */
  describeIrqchip?: () => string[];
  /** Give the vCPU threads host CPUs of their own. */
  pinVcpus?: boolean;
}

/** A built VM, ready to start. */
export class Machine {
  private threads: VcpuThreads;
  private exitResolve!: (e: VmExit) => void;
  private ended = false;
  /** Resolves once, when the VM has ended and its resources are released. */
  readonly exited: Promise<VmExit>;

  /** Wires a machine; the builder calls this. */
  constructor(
    readonly memory: GuestMemory,
    readonly pio: Bus,
    readonly mmio: Bus,
    readonly console: ConsoleHub,
    private readonly starts: VcpuStart[],
    private readonly teardown: Teardown,
    private readonly opts: MachineOptions = {},
  ) {
    this.exited = new Promise((r) => this.exitResolve = r);
    this.threads = new VcpuThreads(pio, mmio, (r) => this.end(describeExit(r, memory)), opts.pinVcpus);
  }

  /** Starts the vCPUs. */
  async start(): Promise<void> {
    try {
      this.teardown.start();
      await this.threads.start(this.starts);
    } catch (e) {
      await this.end({ code: 1, reason: "error", message: (e as Error).message });
      throw e;
    }
  }

  /** Ends the VM (a device asked, a vCPU stopped, or the host asked). Idempotent. */
  async end(exit: VmExit): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    this.exitInfo = exit;
    await this.threads.stop();
    this.console.flush();
    await this.teardown.release();
    this.exitResolve(exit);
  }

  /** Stops the VM from the host side. */
  stop(): Promise<VmExit> {
    this.end({ code: 0, reason: "stopped", message: "stopped by the host" });
    return this.exited;
  }

  /**
   * Where a running guest is: one line per vCPU (kicked out of KVM_RUN, read, resumed)
   * and the interrupt controller's live pins. Empty once the VM has ended.
   */
  async diagnose(): Promise<string[]> {
    if (this.ended) return [];
    // The device report read after this is then current. A device thread that does not
    // answer within a second must not hold up the report of a hung guest.
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.opts.refreshDevices?.().catch(() => {}),
      new Promise((r) => timer = setTimeout(r, 1000)),
    ]);
    clearTimeout(timer);
    const vcpus = (await this.threads.diagnose()).map(({ text, at }) => {
      if (!at || this.ended) return text;
      // The code around RIP: the 15 bytes before it and the 15 at it (a loop shows itself).
      const before = readInstructionBytes(this.memory, { ...at, rip: at.rip - 15n });
      const code = readInstructionBytes(this.memory, at);
      // Unreadable code: show the walk, which tells a bad CR3 from an unmapped page.
      const walk = code || !(at.cr0 & 0x8000_0000n)
        ? ""
        : ` cr3=${hex(at.cr3)} walk: ${describeWalk(this.memory, at.cr3, at.rip)}`;
      return `${text} code=${before ? hexBytes(before) : "?"} | ${code ? hexBytes(code) : "?"}${walk}`;
    });
    return this.ended ? vcpus : [...vcpus, ...(this.opts.describeIrqchip?.() ?? [])];
  }

  /** One line per device describing its state (diagnostics for failure reports). */
  deviceReport(): string[] {
    return this.opts.describeDevices?.() ?? [];
  }

  /** The exit, if the VM has ended. */
  exitInfo: VmExit | undefined;

  /** The vCPU threads' host thread IDs, in vCPU order. */
  get vcpuThreadIds(): number[] {
    return this.threads.tids;
  }

  /** How many device exits the vCPUs made (diagnostics). */
  get exitCount(): number {
    return this.threads.exits;
  }
}
