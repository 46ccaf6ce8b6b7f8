/**
 * tsvmm: a micro-VMM in TypeScript on Deno, driving Linux KVM through FFI.
 *
 * ```ts
 * import { createVm, waitForConsole } from "./mod.ts";
 * const vm = await createVm({ kernel: "vmlinux", initrd: "initramfs.cpio", cpus: 2 });
 * await vm.start();
 * await waitForConsole(vm, /login:/, 30_000);
 * vm.send("poweroff -f\n");
 * console.log(await vm.wait());
 * ```
 * @module
 */

import { buildMachine } from "./vmm/builder.ts";
import type { Machine, VmExit } from "./vmm/machine.ts";
import type { VmConfig } from "./vmm/config.ts";

export {
  type BootProtocol,
  ConfigError,
  DEFAULT_CMDLINE,
  type DiskConfig,
  type NetConfig,
  type RngConfig,
  type TransportKind,
  type VmConfig,
} from "./vmm/config.ts";
export { createPersistentTap, removePersistentTap } from "./vmm/tap.ts";
export type { VmExit } from "./vmm/machine.ts";
export { type CpuidBitChange, parseCpuidMask } from "./vmm/arch/x86_64/cpuid.ts";
export { buildGuest, GUEST_CMDLINE, type GuestAssets } from "./vmm/guest/build.ts";

/** A virtual machine built from a config. */
export class Vm {
  /** Guest console output, as a byte stream (from the moment it is read). */
  readonly output: ReadableStream<Uint8Array>;
  /** Guest console input. */
  readonly input: WritableStream<Uint8Array>;
  private text = "";
  /** Console characters received in all (the text keeps only the last of them). */
  private received = 0;
  private readonly waiters = new Set<() => void>();

  private constructor(private readonly machine: Machine) {
    let unsubscribe = () => {};
    this.output = new ReadableStream<Uint8Array>({
      start: (c) => {
        unsubscribe = machine.console.onOutput((chunk) => c.enqueue(chunk.slice()));
        machine.exited.then(() => {
          unsubscribe();
          try {
            c.close();
          } catch { /* already closed */ }
        });
      },
      cancel: () => unsubscribe(),
    });
    this.input = new WritableStream<Uint8Array>({
      write: async (chunk) => {
        while (!machine.console.input(chunk)) await new Promise((r) => setTimeout(r, 10));
      },
    });
    machine.console.onOutput((chunk) => {
      const piece = new TextDecoder().decode(chunk);
      this.received += piece.length;
      this.text += piece;
      if (this.text.length > 1 << 20) this.text = this.text.slice(-(1 << 19));
      for (const w of this.waiters) w();
    });
    machine.exited.then(() => {
      for (const w of this.waiters) w();
    });
  }

  /** Builds a VM (opens KVM, loads the kernel); throws ConfigError on bad input. */
  static async create(config: VmConfig): Promise<Vm> {
    return new Vm(await buildMachine(config));
  }

  /** Starts the vCPUs. */
  start(): Promise<void> {
    return this.machine.start();
  }

  /** Resolves when the VM has ended. */
  wait(): Promise<VmExit> {
    return this.machine.exited;
  }

  /** Ends the VM from the host. */
  stop(): Promise<VmExit> {
    return this.machine.stop();
  }

  /** Sends text to the guest console. */
  send(text: string): void {
    this.machine.console.input(new TextEncoder().encode(text));
  }

  /** The console output so far (the last MiB at most). */
  get consoleText(): string {
    this.machine.console.flush();
    return this.text;
  }

  /**
   * The host thread IDs of the vCPUs, in vCPU order (empty before `start`): for `taskset`,
   * `perf` or a scheduling policy of your own.
   */
  get vcpuThreadIds(): number[] {
    return this.machine.vcpuThreadIds;
  }

  /** The last few KiB of console output, then how the VM ended and its devices' state. */
  consoleTail(): string {
    this.machine.console.flush();
    const exit = this.machine.exitInfo;
    const devices = this.machine.deviceReport();
    return this.machine.console.tailText() +
      (exit ? `\n[vm ended: ${exit.message}]` : "") +
      (devices.length ? `\n[devices]\n${devices.join("\n")}` : "");
  }

  /**
   * Where a running guest is, for hung-guest reports: each vCPU's RIP, interrupt flag, run
   * state and LAPIC vectors (pending and in service), and the IOAPIC's live pins.
   */
  async diagnose(): Promise<string> {
    const lines = await this.machine.diagnose();
    return lines.length ? `\n[cpu]\n${lines.join("\n")}` : "";
  }

  /**
   * What a hung guest's report shows: where the guest is (`diagnose`, which also brings the
   * device thread's part of the device report up to date), then the console tail with that
   * report.
   */
  async hungReport(): Promise<string> {
    const where = await this.diagnose();
    return this.consoleTail() + where;
  }

  /**
   * A token that changes whenever the guest does something the VMM sees: console output, a
   * device register access (a vCPU exit), or a request taken or completed by a virtio device
   * (the device report's ring counters, which the device thread refreshes in the background,
   * so they may lag a call). Equal tokens some seconds apart mean a guest that stood still.
   */
  progress(): string {
    const counters = this.consoleTail().split("\n[devices]\n")[1]?.match(/(avail|used)=\d+/g) ?? [];
    return `${this.received} ${this.machine.exitCount} ${counters.join(",")}`;
  }

  /** Resolves on the next console output or VM end (for helpers that poll the text). */
  nextOutput(): Promise<void> {
    return new Promise((resolve) => {
      const w = () => {
        this.waiters.delete(w);
        resolve();
      };
      this.waiters.add(w);
    });
  }
}

/** Builds a VM from a config object. */
export function createVm(config: VmConfig): Promise<Vm> {
  return Vm.create(config);
}

/** A console wait that timed out or hit the VM's end; carries the console tail. */
export class ConsoleTimeoutError extends Error {
  /** Builds the error. */
  constructor(message: string, readonly tail: string) {
    super(`${message}\n--- console tail ---\n${tail}`);
    this.name = "ConsoleTimeoutError";
  }
}

/**
 * Waits until the console output (from `from`, a character offset) matches `pattern`.
 * Rejects with the console tail after `timeoutMs`, or if the VM ends first. With `stallMs`,
 * also rejects (with the hung-guest report) as soon as the guest has made no progress the
 * VMM can see (`Vm.progress`: console output, device exits, virtio requests) for that long,
 * so a guest that hung fails in `stallMs` rather than `timeoutMs`.
 */
export async function waitForConsole(
  vm: Vm,
  pattern: RegExp,
  timeoutMs: number,
  from = 0,
  stallMs?: number,
): Promise<RegExpMatchArray> {
  const deadline = Date.now() + timeoutMs;
  let ended = false;
  vm.wait().then(() => ended = true);
  let seen = stallMs !== undefined ? vm.progress() : "";
  let movedAt = Date.now();
  let sampledAt = movedAt;
  for (;;) {
    const m = vm.consoleText.slice(from).match(pattern);
    if (m) return m;
    if (ended) {
      throw new ConsoleTimeoutError(`VM ended before the console showed ${pattern}`, vm.consoleTail());
    }
    const left = deadline - Date.now();
    if (left <= 0) {
      throw new ConsoleTimeoutError(
        `no ${pattern} on the console within ${timeoutMs} ms`,
        await vm.hungReport(),
      );
    }
    // Sampled at most once a second: each sample asks the device thread for its report.
    if (stallMs !== undefined && Date.now() - sampledAt >= 1000) {
      sampledAt = Date.now();
      const now = vm.progress();
      if (now !== seen) {
        seen = now;
        movedAt = Date.now();
      } else if (Date.now() - movedAt >= stallMs) {
        throw new ConsoleTimeoutError(
          `no progress for ${stallMs} ms (no console output, device exit or virtio request) ` +
            `while waiting for ${pattern}`,
          await vm.hungReport(),
        );
      }
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([vm.nextOutput(), new Promise((r) => timer = setTimeout(r, Math.min(left, 1000)))]);
    clearTimeout(timer);
  }
}

/**
 * Boots a VM, runs `body` against it, and always stops it; a VM that outlives
 * `timeoutMs` is stopped and the returned promise rejects with the console tail.
 */
export async function bootTest<T>(
  config: VmConfig,
  body: (vm: Vm) => Promise<T>,
  timeoutMs = 120_000,
): Promise<T> {
  const vm = await createVm(config);
  if (Deno.env.get("TSVMM_ECHO_CONSOLE") === "1") {
    // Debugging aid: the guest console, live, on stderr.
    vm.output.pipeTo(
      new WritableStream({ write: (c) => void Deno.stderr.writeSync(c) }),
    ).catch(() => {});
  }
  await vm.start();
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      body(vm),
      new Promise<never>((_, reject) =>
        timer = setTimeout(
          async () =>
            reject(
              new ConsoleTimeoutError(
                `boot test did not finish within ${timeoutMs} ms`,
                await vm.hungReport(),
              ),
            ),
          timeoutMs,
        )
      ),
    ]);
  } finally {
    clearTimeout(timer);
    await vm.stop();
  }
}
