/**
 * One bench VM under tsvmm or QEMU with the same configuration: the bench's own guest program
 * (tests/bench/bench_guest.ts) on the default kernel and initramfs, `disks` fresh data disks
 * and optionally the read-only tools disk and virtio-rng, all on one transport, and both VMMs
 * pinned the same way: the vCPUs on CPUs of their own (vCPU i on the (i mod (n - 1))-th of the
 * CPUs after the first), every other thread of the VMM on the first CPU. Each VMM runs in a
 * process of its own (ours: tests/bench/ours_vm.ts), so what is read for it is its own. While
 * the guest runs, its console is followed: the moment it reached user space, and the VMM's CPU
 * time and RSS across each phase it marks (tests/bench/vmm_cost.ts).
 */

import type { Vm, VmConfig } from "../../mod.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";
import type { TransportKind } from "../../vmm/config.ts";
import { sysGetAffinity, sysSetAffinity } from "../../vmm/sys/libc.ts";
import { qemuMicrovmArgs, vmTimeoutMs } from "./boot_bench.ts";
import { benchCmdline, benchInitrd, DONE_MARKER, USERSPACE_MARKER } from "./bench_guest.ts";
import { PhaseMeter } from "./vmm_cost.ts";

const MIB = 1024 * 1024;
const DISK_MIB = 64;

/** What one bench VM carries. */
export interface BenchVm {
  /** The guest program (bench_guest.ts), run as the guest's first process. */
  script: string;
  /** Guest RAM. */
  memoryMiB: number;
  /** vCPUs (default 1). */
  cpus?: number;
  /** Fresh 64 MiB data disks (default 1). */
  disks?: number;
  /** A virtio-rng device. */
  rng?: boolean;
  /** The read-only tools disk (fio), after the data disks. */
  tools?: string;
  /** Sees the console so far and the VMM's process id each time more of it arrives. */
  watch?: (text: string, pid: number) => void;
}

/** What a bench VM run gave. */
export interface BenchRun {
  /** The console. */
  text: string;
  /** The VMM's CPU time and RSS across the guest's phases. */
  meter: PhaseMeter;
  /** Ours only: the device report lines at the end of the run. */
  devices?: string[];
  /** ms from spawning the VMM's process (ours_vm.ts, or QEMU) to the guest's first user-space line. */
  userspaceMs: number;
}

async function images(n: number): Promise<string[]> {
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const p = await Deno.makeTempFile({ suffix: ".img" });
    out.push(p);
    await Deno.writeFile(p, new Uint8Array(DISK_MIB * MIB).fill(0x5a)); // real blocks, not holes
  }
  return out;
}

/** The line before the device report in a VM's console tail (and in ours_vm.ts's output). */
export const REPORT_MARK = "\n[devices]\n";

/** The device report's lines, as a stopped VM of ours printed them at the end of its console. */
export function deviceReport(vm: Vm): string[] {
  return vm.consoleTail().split(REPORT_MARK)[1]?.split("\n") ?? [];
}

/** One request split of a device's report line (vmm/device_worker.ts), in us. */
export interface ReportSpans {
  /** Median of the latest 256. */
  median: number;
  /** How many there were in all. */
  count: number;
  /** 90th percentile of the latest 256. */
  p90: number;
  /** Mean of the latest 256. */
  mean: number;
}

/**
 * The spans `key` (`doorbell_to_irq_us`, `irq_to_doorbell_us`) of the device named `device`
 * in `report`; throws naming both if the line has none.
 */
export function reportSpans(report: readonly string[], device: string, key: string): ReportSpans {
  const line = report.find((l) => l.includes(device)) ?? "";
  const m = new RegExp(`${key}=(\\d+) \\((\\d+)\\) p90=(\\d+) mean=(\\d+)`).exec(line);
  if (!m) throw new Error(`no ${key} in the ${device} device's report: ${line}`);
  return { median: Number(m[1]), count: Number(m[2]), p90: Number(m[3]), mean: Number(m[4]) };
}

/** Follows the console: the user-space moment and the phases, until the done line. */
class Follower {
  readonly meter: PhaseMeter;
  userspaceMs = -1;
  constructor(
    private readonly pid: number,
    memoryMiB: number,
    private readonly t0: number,
    private readonly watch?: (text: string, pid: number) => void,
  ) {
    this.meter = new PhaseMeter(pid, memoryMiB);
  }
  feed(text: string): boolean {
    this.watch?.(text, this.pid);
    if (this.userspaceMs < 0 && text.includes(USERSPACE_MARKER)) {
      this.userspaceMs = performance.now() - this.t0;
    }
    this.meter.feed(text);
    return DONE_MARKER.test(text);
  }
}

const OURS_VM = new URL("./ours_vm.ts", import.meta.url).pathname;

/**
 * Boots tsvmm with `b` in a process of its own (ours_vm.ts), measured by its pid as QEMU is;
 * resolves once the guest powered off. A run that hangs rejects after vmTimeoutMs() with the
 * console tail and the hung-guest report.
 */
export async function runOurs(g: GuestAssets, b: BenchVm, transport: TransportKind): Promise<BenchRun> {
  const data = await images(b.disks ?? 1);
  try {
    const k = g.kernels["6.1"];
    const disks = [
      ...data.map((path) => ({ path, transport })),
      ...(b.tools ? [{ path: b.tools, readonly: true, transport }] : []),
    ];
    const initrd = await benchInitrd(k.initramfs, b.script);
    const config: VmConfig = {
      kernel: k.vmlinux,
      initrd,
      memoryMiB: b.memoryMiB,
      cpus: b.cpus ?? 1,
      disks,
      rng: b.rng ? { transport } : undefined,
      cmdline: benchCmdline(),
      // A vCPU sharing its CPU with the VMM's threads is what makes long interrupt-heavy
      // runs fail under the nested runner (README, Known problems).
      pinVcpus: true,
      // TSVMM_DEVICE_THREAD=0: the queues on the main thread (the before of README's breakdown).
      deviceThread: Deno.env.get("TSVMM_DEVICE_THREAD") !== "0",
      // TSVMM_MMIO_REGISTER_PAGES=0: every virtio-MMIO register read exits (the before).
      mmioRegisterPages: Deno.env.get("TSVMM_MMIO_REGISTER_PAGES") !== "0",
    };
    const t0 = performance.now();
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", OURS_VM, JSON.stringify({ config, timeoutMs: vmTimeoutMs() })],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    // The child ends a hung VM itself (bootTest's timeout); this is for a child that cannot.
    const timer = setTimeout(() => child.kill("SIGKILL"), vmTimeoutMs() + 60_000);
    const stderr = new Response(child.stderr).text();
    const f = new Follower(child.pid, b.memoryMiB, t0, b.watch);
    let out = "";
    const dec = new TextDecoder();
    for await (const chunk of child.stdout) {
      out += dec.decode(chunk, { stream: true });
      f.feed(out.split(REPORT_MARK)[0]);
    }
    const st = await child.status;
    clearTimeout(timer);
    const [text, report] = out.split(REPORT_MARK);
    if (!st.success || !DONE_MARKER.test(text)) {
      throw new Error(
        `the VM ended (exit ${st.code}) before ${DONE_MARKER}\n${text.slice(-2000)}\n${
          (await stderr).slice(-4000)
        }`,
      );
    }
    return { text, meter: f.meter, userspaceMs: f.userspaceMs, devices: report?.trimEnd().split("\n") ?? [] };
  } finally {
    for (const p of data) await Deno.remove(p);
  }
}

/** The same VM under QEMU microvm on the same transport; rejects with the console tail if it fails. */
export async function runQemu(g: GuestAssets, b: BenchVm, transport: TransportKind): Promise<BenchRun> {
  const data = await images(b.disks ?? 1);
  try {
    const k = g.kernels["6.1"];
    const dev = (kind: string, props: string) => qemuVirtioDevice(kind, props, transport);
    const initrd = await benchInitrd(k.initramfs, b.script);
    const args = qemuMicrovmArgs(k.vmlinux, initrd, benchCmdline(), b.memoryMiB, b.cpus ?? 1);
    if (transport.startsWith("pci")) args[args.indexOf("microvm,acpi=on")] = "microvm,acpi=on,pcie=on";
    // One request queue per disk, as ours has (QEMU's virtio-blk-pci would take one per vCPU).
    const disks = [...data.map((p) => [p, ""]), ...(b.tools ? [[b.tools, ",readonly=on"]] : [])];
    disks.forEach(([p, ro], i) => {
      args.push("-drive", `id=d${i},file=${p},format=raw,if=none${ro}`);
      args.push("-device", dev("blk", `drive=d${i},num-queues=1`));
    });
    if (b.rng) {
      args.push("-object", "rng-random,id=r0,filename=/dev/urandom", "-device", dev("rng", "rng=r0"));
    }
    let f: Follower | undefined;
    const t0 = performance.now();
    const text = await runPinnedQemu(args, DONE_MARKER, (text, pid) => {
      f ??= new Follower(pid, b.memoryMiB, t0, b.watch);
      f.feed(text);
    });
    return { text, meter: f!.meter, userspaceMs: f!.userspaceMs };
  } finally {
    for (const p of data) await Deno.remove(p);
  }
}

/** QEMU's `-device` for a virtio `kind` ("blk", "net", ...) on the same transport as ours. */
export function qemuVirtioDevice(kind: string, props: string, transport: TransportKind): string {
  if (!transport.startsWith("pci")) return `virtio-${kind}-device,${props}`;
  const modes = transport === "pci-legacy" ? "disable-modern=on,disable-legacy=off" : "disable-legacy=on";
  return `virtio-${kind}-pci,${props},${modes}`;
}

/**
 * Runs QEMU with `args`, pinned as ours are (pinQemu), killed after vmTimeoutMs(); returns its
 * console once `marker` is on it, else throws with the console tail. `onConsole` sees the
 * console so far (and QEMU's pid) each time more of it arrives.
 */
export async function runPinnedQemu(
  args: string[],
  marker: RegExp,
  onConsole?: (text: string, pid: number) => void,
): Promise<string> {
  const cpus = sysGetAffinity();
  const child = new Deno.Command("qemu-system-x86_64", {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let killed = false;
  const timer = setTimeout(() => {
    killed = true;
    child.kill("SIGKILL");
  }, vmTimeoutMs());
  const pinning = cpus.length > 1 ? setInterval(() => pinQemu(child.pid, cpus), 100) : undefined;
  const stderr = new Response(child.stderr).text();
  let text = "";
  const dec = new TextDecoder();
  for await (const chunk of child.stdout) {
    text += dec.decode(chunk, { stream: true });
    onConsole?.(text, child.pid);
  }
  const st = await child.status;
  clearInterval(pinning);
  clearTimeout(timer);
  if (killed) {
    throw new Error(
      `QEMU did not end within ${vmTimeoutMs()} ms\n--- console tail ---\n${text.slice(-2000)}`,
    );
  }
  if (!marker.test(text)) {
    throw new Error(
      `QEMU ended (exit ${st.code}) without ${marker}\n--- console tail ---\n${text.slice(-2000)}` +
        (await stderr).trim(),
    );
  }
  return text;
}

/**
 * Pins QEMU as pinVcpus pins ours: its vCPU threads ("CPU i/KVM") on the CPUs this process
 * may use after the first (vCPU i on the (i mod (n - 1))-th), every other thread on the
 * first. Called repeatedly while QEMU runs, so threads it starts later are pinned too.
 */
export function pinQemu(pid: number, cpus: number[]): void {
  const [vmm, ...rest] = cpus;
  try {
    for (const t of Deno.readDirSync(`/proc/${pid}/task`)) {
      const comm = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/comm`).trim();
      const vcpu = /^CPU (\d+)\/KVM$/.exec(comm);
      sysSetAffinity(Number(t.name), [vcpu ? rest[Number(vcpu[1]) % rest.length] : vmm]);
    }
  } catch {
    // QEMU (or one of its threads) is gone.
  }
}
