/**
 * Boot-time benchmark: spawn/create to the guest's /init marker, our VMM (through the
 * API and through the CLI) and QEMU (`-M microvm,acpi=on`), same kernel, initramfs,
 * RAM and vCPUs, alternating runs; medians. Runs wherever KVM runs stock kernels
 * (natively, or inside the nested runner's L1).
 */

import { createVm, waitForConsole } from "../../mod.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";

/** One benchmark's figures. */
export interface BenchFigure {
  /** What was measured. */
  name: string;
  /** Each run, in `unit`. */
  runs: number[];
  /** Median, in `unit`. */
  median: number;
  /** ms, us/exit, MB/s or IOPS. */
  unit: string;
}

/** Where figures go the moment they are measured. */
export interface BenchSink {
  /** One measured value of a figure. */
  value(name: string, value: number, unit: string): void;
  /** A figure, or one run of it, that could not be taken, and why (console tail, hung-guest report). */
  missing(name: string, why: string): void;
}

/** How long one VM run of the bench may take, in ms (TSVMM_BENCH_VM_TIMEOUT_S, default 300 s). */
export function vmTimeoutMs(): number {
  return Number(Deno.env.get("TSVMM_BENCH_VM_TIMEOUT_S") ?? "300") * 1000;
}

/** Collects runs per figure; each one goes to the sink as it is measured. */
export class FigureSet {
  private readonly runs = new Map<string, { unit: string; v: number[] }>();

  /** Figures land in `sink` as they come. */
  constructor(private readonly sink: BenchSink) {}

  /** Runs `f` for run `i` of figure `name`; a throw is reported as that run missing. */
  async measure(name: string, unit: string, i: number, f: () => Promise<number>): Promise<boolean> {
    try {
      this.add(name, unit, await f());
      return true;
    } catch (e) {
      this.sink.missing(`${name}, run ${i + 1}`, String((e as Error).message ?? e));
      return false;
    }
  }

  /** Records one measured value. */
  add(name: string, unit: string, v: number): void {
    const e = this.runs.get(name) ?? { unit, v: [] };
    e.v.push(v);
    this.runs.set(name, e);
    this.sink.value(name, v, unit);
  }

  /**
   * The medians of everything measured at least once, to 4 significant digits (so a rate of
   * 0.0x MB/s keeps its own digits and is not rounded to a few steps).
   */
  figures(): BenchFigure[] {
    const round = (x: number) => Number(x.toPrecision(4));
    return [...this.runs].map(([name, { unit, v }]) => ({
      name,
      unit,
      runs: v.map(round),
      median: round(median(v)),
    }));
  }
}

const MARKER = "TSVMM-INIT-MARKER";
const CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet";
const MEMORY_MIB = 256;

/** QEMU's command line for the peer: microvm with ACPI, KVM, serial on stdio, direct kernel boot, no NIC. */
export function qemuMicrovmArgs(
  kernel: string,
  initrd: string,
  cmdline: string,
  memMiB: number,
  cpus = 1,
): string[] {
  return [
    ...["-accel", "kvm", "-M", "microvm,acpi=on", "-cpu", "host", "-m", String(memMiB), "-smp", String(cpus)],
    ...[
      "-nodefaults",
      "-no-user-config",
      "-nic",
      "none",
      "-display",
      "none",
      "-serial",
      "stdio",
      "-no-reboot",
    ],
    ...["-kernel", kernel, "-initrd", initrd, "-append", cmdline],
  ];
}

/** The median of a list. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Spawns a command and resolves with ms until `marker` appears on stdout, then waits for its exit. */
async function spawnToMarker(cmd: string, args: string[], timeoutMs = vmTimeoutMs()): Promise<number> {
  const t0 = performance.now();
  const child = new Deno.Command(cmd, { args, stdin: "null", stdout: "piped", stderr: "piped" }).spawn();
  let killed = false;
  const timer = setTimeout(() => {
    killed = true;
    child.kill("SIGKILL");
  }, timeoutMs);
  const stderr = new Response(child.stderr).text();
  let text = "";
  let at = -1;
  const dec = new TextDecoder();
  for await (const chunk of child.stdout) {
    text = (text + dec.decode(chunk, { stream: true })).slice(-4096);
    if (at < 0 && text.includes(MARKER)) at = performance.now() - t0;
  }
  const st = await child.status;
  clearTimeout(timer);
  if (killed) {
    throw new Error(`${cmd} did not end within ${timeoutMs} ms\n--- console tail ---\n${text.slice(-2000)}`);
  }
  if (at < 0) {
    throw new Error(
      `${cmd}: no ${MARKER} (exit ${st.code})\n--- console tail ---\n${text.slice(-2000)} ${await stderr}`,
    );
  }
  return at;
}

/** Runs `runs` boots of each VMM, alternating; each figure goes to `sink` as it is measured. */
export async function bootBench(
  g: GuestAssets,
  runs: number,
  sink: BenchSink,
  cpus = 1,
): Promise<BenchFigure[]> {
  const k = g.kernels["6.1"];
  const set = new FigureSet(sink);
  const cliPath = new URL("../../vmm/cli.ts", import.meta.url).pathname;
  for (let i = 0; i < runs; i++) {
    await set.measure(`tsvmm API: createVm -> /init marker (${cpus} vCPU)`, "ms", i, async () => {
      const t0 = performance.now();
      const vm = await createVm({
        kernel: k.vmlinux,
        initrd: k.initramfs,
        cmdline: CMDLINE,
        memoryMiB: MEMORY_MIB,
        cpus,
      });
      try {
        await vm.start();
        await waitForConsole(vm, new RegExp(MARKER), vmTimeoutMs()); // rejects with the tail and vCPU report
        const ms = performance.now() - t0;
        const exit = await vm.wait();
        if (exit.code !== 0) throw new Error(`VM ended with ${exit.message}\n${vm.consoleTail()}`);
        return ms;
      } finally {
        await vm.stop();
      }
    });
    await set.measure(
      `tsvmm CLI: process start -> /init marker (${cpus} vCPU)`,
      "ms",
      i,
      () =>
        spawnToMarker(Deno.execPath(), [
          "run",
          "-A",
          "--no-check",
          cliPath,
          `--kernel=${k.vmlinux}`,
          `--initrd=${k.initramfs}`,
          `--cmdline=${CMDLINE}`,
          `--memory=${MEMORY_MIB}`,
          `--cpus=${cpus}`,
        ]),
    );
    await set.measure(
      `QEMU microvm: process start -> /init marker (${cpus} vCPU)`,
      "ms",
      i,
      () =>
        spawnToMarker(
          "qemu-system-x86_64",
          qemuMicrovmArgs(k.vmlinux, k.initramfs, CMDLINE, MEMORY_MIB, cpus),
        ),
    );
  }
  return set.figures();
}
