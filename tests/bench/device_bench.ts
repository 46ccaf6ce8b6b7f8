/**
 * virtio-blk and virtio-rng throughput with dd in the guest, and 4 KiB random IOPS with fio,
 * tsvmm beside QEMU on the same transport: virtio-PCI modern (QEMU microvm with pcie=on,
 * virtio-*-pci, disable-legacy=on), virtio-PCI legacy (disable-modern=on) and virtio-MMIO
 * (microvm's virtio-*-device). Same kernel, initramfs and image size, and both pinned the
 * same way: the vCPU on a CPU of its own, every other thread of the VMM on the first CPU.
 */

import { bootTest, waitForConsole } from "../../mod.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";
import { type BenchFigure, type BenchSink, FigureSet, qemuMicrovmArgs, vmTimeoutMs } from "./boot_bench.ts";
import type { TransportKind } from "../../vmm/config.ts";
import { sysGetAffinity, sysSetAffinity } from "../../vmm/sys/libc.ts";

/** The transports the device bench compares (TSVMM_BENCH_TRANSPORTS, comma-separated). */
export const BENCH_TRANSPORTS: TransportKind[] =
  (Deno.env.get("TSVMM_BENCH_TRANSPORTS") ?? "pci,pci-legacy,mmio")
    .split(",").filter((t) => t) as TransportKind[];

const MIB = 1024 * 1024;
const DISK_MIB = 64;
const RW_MIB = 32;
const CMDLINE = `console=ttyS0 reboot=k panic=-1 quiet tsvmm.checks=ddbench tsvmm.ddbench=vda:${RW_MIB}`;

/** MB/s from the guest's ddbench line (seconds measured in the guest with /proc/uptime). */
function parse(text: string): { read: number; write: number; rng: number } {
  const m = /TSVMM-CHECK ddbench mb=(\d+) read_s=([\d.]+) write_s=([\d.]+) rng_kib=(\d+) rng_s=([\d.]+)/.exec(
    text,
  );
  if (!m) throw new Error("no ddbench line on the console");
  const rate = (mib: number, s: string) => mib / Math.max(Number(s), 0.01);
  return {
    read: rate(Number(m[1]), m[2]),
    write: rate(Number(m[1]), m[3]),
    rng: rate(Number(m[4]) / 1024, m[5]),
  };
}

async function image(): Promise<string> {
  const p = await Deno.makeTempFile({ suffix: ".img" });
  await Deno.writeFile(p, new Uint8Array(DISK_MIB * MIB).fill(0x5a)); // real blocks, not holes
  return p;
}

/** Extra disks and devices of one bench boot. */
interface BenchVm {
  cmdline: string;
  memoryMiB: number;
  /** The line the guest prints when done. */
  marker: RegExp;
  rng?: boolean;
  /** A read-only second disk. */
  tools?: string;
}

/**
 * Boots tsvmm with a fresh data disk (plus `b`'s devices); returns the console text. A run
 * that hangs rejects after vmTimeoutMs() with the console tail and the hung-guest report.
 */
async function ours(g: GuestAssets, b: BenchVm, transport: TransportKind): Promise<string> {
  const img = await image();
  try {
    const k = g.kernels["6.1"];
    const disks = [
      { path: img, transport },
      ...(b.tools ? [{ path: b.tools, readonly: true, transport }] : []),
    ];
    return await bootTest(
      {
        kernel: k.vmlinux,
        initrd: k.initramfs,
        memoryMiB: b.memoryMiB,
        disks,
        rng: b.rng ? { transport } : undefined,
        cmdline: b.cmdline,
        // A vCPU sharing its CPU with the VMM's threads is what makes long interrupt-heavy
        // runs fail under the nested runner (README, Known problems).
        pinVcpus: true,
      },
      async (vm) => {
        await waitForConsole(vm, b.marker, vmTimeoutMs());
        await vm.wait();
        return vm.consoleText;
      },
      vmTimeoutMs() + 30_000,
    );
  } finally {
    await Deno.remove(img);
  }
}

/**
 * The same boot under QEMU microvm with its virtio-mmio devices; returns the console text.
 * A run past vmTimeoutMs() is killed and rejects with its console tail.
 */
async function qemu(g: GuestAssets, b: BenchVm, transport: TransportKind): Promise<string> {
  const img = await image();
  try {
    const k = g.kernels["6.1"];
    const pci = transport.startsWith("pci");
    const dev = (kind: string, props: string) => qemuVirtioDevice(kind, props, transport);
    const args = qemuMicrovmArgs(k.vmlinux, k.initramfs, b.cmdline, b.memoryMiB);
    if (pci) args[args.indexOf("microvm,acpi=on")] = "microvm,acpi=on,pcie=on";
    args.push("-drive", `id=d0,file=${img},format=raw,if=none`, "-device", dev("blk", "drive=d0"));
    if (b.tools) {
      args.push("-drive", `id=d1,file=${b.tools},format=raw,if=none,readonly=on`);
      args.push("-device", dev("blk", "drive=d1"));
    }
    if (b.rng) {
      args.push("-object", "rng-random,id=r0,filename=/dev/urandom", "-device", dev("rng", "rng=r0"));
    }
    return await runPinnedQemu(args, b.marker);
  } finally {
    await Deno.remove(img);
  }
}

/** QEMU's `-device` for a virtio `kind` ("blk", "net", ...) on the same transport as ours. */
export function qemuVirtioDevice(kind: string, props: string, transport: TransportKind): string {
  if (!transport.startsWith("pci")) return `virtio-${kind}-device,${props}`;
  const modes = transport === "pci-legacy" ? "disable-modern=on,disable-legacy=off" : "disable-legacy=on";
  return `virtio-${kind}-pci,${props},${modes}`;
}

/**
 * Runs QEMU with `args`, pinned as ours are (every thread on the first CPU, the vCPU thread
 * on the next), killed after vmTimeoutMs(); returns its console once `marker` is on it, else
 * throws with the console tail.
 */
export async function runPinnedQemu(args: string[], marker: RegExp): Promise<string> {
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
  const out = await child.output();
  clearInterval(pinning);
  clearTimeout(timer);
  const text = new TextDecoder().decode(out.stdout);
  if (killed) {
    throw new Error(
      `QEMU did not end within ${vmTimeoutMs()} ms\n--- console tail ---\n${text.slice(-2000)}`,
    );
  }
  if (!marker.test(text)) {
    throw new Error(
      `QEMU ended (exit ${out.code}) without ${marker}\n--- console tail ---\n${text.slice(-2000)}` +
        new TextDecoder().decode(out.stderr).trim(),
    );
  }
  return text;
}

/**
 * Pins QEMU as pinVcpus pins ours: its vCPU thread ("CPU 0/KVM") on the second CPU this
 * process may use, every other thread on the first. Called repeatedly while QEMU runs, so
 * threads it starts later are pinned too.
 */
export function pinQemu(pid: number, cpus: number[]): void {
  try {
    for (const t of Deno.readDirSync(`/proc/${pid}/task`)) {
      const comm = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/comm`).trim();
      sysSetAffinity(Number(t.name), [comm === "CPU 0/KVM" ? cpus[1] : cpus[0]]);
    }
  } catch {
    // QEMU (or one of its threads) is gone.
  }
}

const DD: BenchVm = { cmdline: CMDLINE, memoryMiB: 256, marker: /TSVMM-CHECK ddbench .*/, rng: true };

const FIO_SECONDS = 5;
const FIO_JOBS = ["randread_qd1", "randread_qd32", "randwrite_qd1", "randwrite_qd32"] as const;

/** fio's boot: the tools disk is found by the guest, whatever order the VMM gives the disks. */
function fioVm(tools: string): BenchVm {
  return {
    cmdline: `console=ttyS0 reboot=k panic=-1 quiet tsvmm.checks=fio tsvmm.fio=${FIO_SECONDS}`,
    memoryMiB: 512,
    marker: /TSVMM-CHECK fio .*/,
    tools,
  };
}

/** IOPS per fio job from the guest's fio line. */
function parseFio(text: string): Record<string, number> {
  const m = /TSVMM-CHECK fio (.*)/.exec(text);
  if (!m || m[1].includes("error=")) {
    throw new Error(`fio did not run in the guest: ${m?.[0] ?? "no fio line"}`);
  }
  const r: Record<string, number> = {};
  for (const j of FIO_JOBS) {
    const v = Number(new RegExp(`${j}=([\\d.]+)`).exec(m[1])?.[1]);
    if (!(v > 0)) throw new Error(`fio reported no IOPS for ${j}: ${m[0]}`);
    r[j] = v;
  }
  return r;
}

/** The figures deviceBench takes (fio's only with a tools disk). */
export function deviceFigureNames(withFio: boolean): string[] {
  const dd = ["blk sequential read MB/s", "blk sequential write MB/s (fsync)", "rng MB/s (/dev/hwrng)"];
  const fio = FIO_JOBS.map((j) => `blk 4 KiB ${j.replace("_qd", " QD")} IOPS`);
  return BENCH_TRANSPORTS.flatMap((t) =>
    ["tsvmm", "QEMU"].flatMap((who) => [...dd, ...(withFio ? fio : [])].map((f) => `${who} ${t} ${f}`))
  );
}

/**
 * Device throughput, `runs` alternating runs each; every value goes to `sink` as it is
 * measured, and a run that fails or hangs is reported there as missing while the bench
 * goes on with the next one.
 */
export async function deviceBench(g: GuestAssets, runs: number, sink: BenchSink): Promise<BenchFigure[]> {
  const set = new FigureSet(sink);
  const dd = async (who: "tsvmm" | "QEMU", t: TransportKind, i: number) => {
    let text: string;
    try {
      text = who === "tsvmm" ? await ours(g, DD, t) : await qemu(g, DD, t);
    } catch (e) {
      sink.missing(`${who} ${t} dd read, write and rng, run ${i + 1}`, String((e as Error).message ?? e));
      return;
    }
    const name = (f: string) => `${who} ${t} ${f}`;
    await set.measure(name("blk sequential read MB/s"), "MB/s", i, () => Promise.resolve(parse(text).read));
    await set.measure(
      name("blk sequential write MB/s (fsync)"),
      "MB/s",
      i,
      () => Promise.resolve(parse(text).write),
    );
    await set.measure(name("rng MB/s (/dev/hwrng)"), "MB/s", i, () => Promise.resolve(parse(text).rng));
  };
  const fio = async (who: "tsvmm" | "QEMU", t: TransportKind, i: number) => {
    try {
      const vm = fioVm(g.toolsImage!);
      const text = who === "tsvmm" ? await ours(g, vm, t) : await qemu(g, vm, t);
      const r = parseFio(text);
      for (const j of FIO_JOBS) {
        set.add(`${who} ${t} blk 4 KiB ${j.replace("_qd", " QD")} IOPS`, "IOPS", r[j]);
      }
    } catch (e) {
      sink.missing(`${who} ${t} fio random IOPS, run ${i + 1}`, String((e as Error).message ?? e));
    }
  };
  for (let i = 0; i < runs; i++) {
    for (const t of BENCH_TRANSPORTS) {
      await dd("tsvmm", t, i);
      await dd("QEMU", t, i);
      if (g.toolsImage) {
        await fio("tsvmm", t, i);
        await fio("QEMU", t, i);
      }
    }
  }
  if (!g.toolsImage) sink.missing("fio random IOPS", "no fio tools disk");
  return set.figures();
}
