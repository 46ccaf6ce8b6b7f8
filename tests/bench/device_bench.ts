/**
 * virtio-blk and virtio-rng throughput with dd in the guest, and 4 KiB random IOPS with fio,
 * tsvmm beside QEMU on the same transport: virtio-PCI modern (QEMU microvm with pcie=on,
 * virtio-*-pci, disable-legacy=on), virtio-PCI legacy (disable-modern=on) and virtio-MMIO
 * (microvm's virtio-*-device). Same kernel, initramfs and image size, and both pinned the
 * same way: the vCPU on a CPU of its own, every other thread of the VMM on the first CPU
 * (tests/bench/bench_vms.ts). Beside each rate, what it cost the host: the VMM's CPU time
 * across exactly that step (the guest marks it on its console) per GiB or per 10k I/Os, and
 * the VMM's RSS beyond guest RAM (tests/bench/vmm_cost.ts).
 */

import type { GuestAssets } from "../../vmm/guest/build.ts";
import { type BenchFigure, type BenchSink, FigureSet } from "./boot_bench.ts";
import type { TransportKind } from "../../vmm/config.ts";
import { ddScript, FIO_JOBS, fioScript, removeBenchInitrds } from "./bench_guest.ts";
import { type BenchRun, type BenchVm, reportSpans, runOurs, runQemu } from "./bench_vms.ts";
import type { PhaseCost } from "./vmm_cost.ts";

/** The transports the device bench compares (TSVMM_BENCH_TRANSPORTS, comma-separated). */
export const BENCH_TRANSPORTS: TransportKind[] =
  (Deno.env.get("TSVMM_BENCH_TRANSPORTS") ?? "pci,pci-legacy,mmio")
    .split(",").filter((t) => t) as TransportKind[];

/** How long each fio job runs in the guest, in seconds (TSVMM_BENCH_FIO_S, default 5). */
export function fioSeconds(): number {
  return Number(Deno.env.get("TSVMM_BENCH_FIO_S") ?? "5");
}

const RW_MIB = 32;
/** The 64 KiB rng read that follows the first 16 KiB (the device's code warm by then). */
const RNG_WARM = "rng MB/s (/dev/hwrng, 64 KiB after the first 16)";

/** MB/s from the guest's ddbench line (seconds measured in the guest by its monotonic clock, to the us). */
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

const DD: BenchVm = { script: ddScript(RW_MIB), memoryMiB: 256, rng: true };

/** fio's boot: the tools disk is found by the guest, whatever order the VMM gives the disks. */
function fioVm(tools: string): BenchVm {
  return { script: fioScript(fioSeconds()), memoryMiB: 512, tools };
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

const jobName = (j: string) => j.replace("_qd", " QD");
/** Units of the cost figures (lower is better). */
export const COST_UNITS: string[] = ["CPU s/GiB", "CPU s/10k I/Os", "MiB"];
const CPU_KINDS: ReadonlyArray<readonly [string, (p: PhaseCost) => number]> = [
  ["", (p) => p.cpu],
  [", less guest time", (p) => p.cpuLessGuest],
  // The same by kind of thread (tests/bench/vmm_cost.ts, ThreadCpu).
  [", vCPU threads less guest time", (p) => p.threads.vcpu],
  [", main thread", (p) => p.threads.main],
  [", other threads", (p) => p.threads.rest],
];
const RSS_FIGURE = "VMM RSS beyond guest RAM (end of fio)";
const RSS_LESS_FILES = "VMM RSS beyond guest RAM, less mapped files (end of fio)";

/** The figures deviceBench takes (fio's only with a tools disk). */
export function deviceFigureNames(withFio: boolean): string[] {
  const dd = [
    "blk sequential read MB/s",
    "blk sequential write MB/s (fsync)",
    "rng MB/s (/dev/hwrng)",
    RNG_WARM,
  ];
  const ddCost = ["read", "write"].flatMap((rw) => CPU_KINDS.map(([k]) => `cost: blk sequential ${rw}${k}`));
  const fio = FIO_JOBS.flatMap((j) => [
    `blk 4 KiB ${jobName(j)} IOPS`,
    ...CPU_KINDS.map(([k]) => `cost: blk 4 KiB ${jobName(j)}${k}`),
  ]);
  return BENCH_TRANSPORTS.flatMap((t) =>
    ["tsvmm", "QEMU"].flatMap((who) =>
      [...dd, ...ddCost, ...(withFio ? [...fio, RSS_FIGURE, RSS_LESS_FILES] : [])].map((f) =>
        `${who} ${t} ${f}`
      )
    )
  );
}

/**
 * Device throughput and what it cost the host, `runs` alternating runs each; every value goes
 * to `sink` as it is measured, and a run that fails or hangs (or a figure that cannot be read
 * from it) is reported there as missing while the bench goes on.
 */
export async function deviceBench(g: GuestAssets, runs: number, sink: BenchSink): Promise<BenchFigure[]> {
  const set = new FigureSet(sink);
  const boot = async (who: "tsvmm" | "QEMU", b: BenchVm, t: TransportKind, what: string, i: number) => {
    try {
      return await (who === "tsvmm" ? runOurs(g, b, t) : runQemu(g, b, t));
    } catch (e) {
      sink.missing(`${who} ${t} ${what}, run ${i + 1}`, String((e as Error).message ?? e));
    }
  };
  // CPU seconds across `phase` per `per()` units of work (GiB, 10k I/Os).
  const cost = async (
    name: string,
    unit: string,
    i: number,
    r: BenchRun,
    phase: string,
    per: () => number,
  ) => {
    for (const [k, f] of CPU_KINDS) {
      await set.measure(`${name}${k}`, unit, i, () => {
        const n = per();
        if (!(n > 0)) throw new Error(`no amount of work for phase ${phase}: ${r.meter.get(phase).note}`);
        return Promise.resolve(f(r.meter.get(phase)) / n);
      });
    }
  };
  const dd = async (who: "tsvmm" | "QEMU", t: TransportKind, i: number) => {
    const r = await boot(who, DD, t, "dd read, write and rng", i);
    if (!r) return;
    const name = (f: string) => `${who} ${t} ${f}`;
    const v = () => Promise.resolve(parse(r.text));
    await set.measure(name("blk sequential read MB/s"), "MB/s", i, async () => (await v()).read);
    await set.measure(name("blk sequential write MB/s (fsync)"), "MB/s", i, async () => (await v()).write);
    await set.measure(name("rng MB/s (/dev/hwrng)"), "MB/s", i, async () => (await v()).rng);
    await set.measure(name(RNG_WARM), "MB/s", i, () => {
      const s = /TSVMM-CHECK rng64 s=([\d.]+)/.exec(r.text)?.[1];
      if (s === undefined) throw new Error("no rng64 line on the console");
      return Promise.resolve(64 / 1024 / Math.max(Number(s), 0.01));
    });
    if (who === "tsvmm") {
      // Where one rng request's time goes, from the device thread's side (vmm/device_worker.ts).
      const split = (key: string, which: "median" | "p90" | "mean") => () =>
        Promise.resolve(reportSpans(r.devices ?? [], "virtio-rng", key)[which]);
      const spans = [["doorbell_to_irq_us", "doorbell -> interrupt"], [
        "irq_to_doorbell_us",
        "interrupt -> next doorbell",
      ]];
      for (const [key, what] of spans) {
        await set.measure(name(`rng request: ${what}`), "us", i, split(key, "median"));
        await set.measure(name(`rng request: ${what}, p90 of the last 256`), "us", i, split(key, "p90"));
        await set.measure(name(`rng request: ${what}, mean of the last 256`), "us", i, split(key, "mean"));
      }
    }
    for (const rw of ["read", "write"]) {
      await cost(name(`cost: blk sequential ${rw}`), "CPU s/GiB", i, r, `seq_${rw}`, () => RW_MIB / 1024);
    }
  };
  const fio = async (who: "tsvmm" | "QEMU", t: TransportKind, i: number) => {
    const r = await boot(who, fioVm(g.toolsImage!), t, "fio random IOPS", i);
    if (!r) return;
    const name = (f: string) => `${who} ${t} ${f}`;
    let iops: Record<string, number>;
    try {
      iops = parseFio(r.text);
    } catch (e) {
      sink.missing(name(`fio random IOPS, run ${i + 1}`), String((e as Error).message ?? e));
      return;
    }
    for (const j of FIO_JOBS) set.add(name(`blk 4 KiB ${jobName(j)} IOPS`), "IOPS", iops[j]);
    for (const j of FIO_JOBS) {
      const per10k = () => Number(/ios=(\d+)/.exec(r.meter.get(j).note)?.[1]) / 10_000;
      await cost(name(`cost: blk 4 KiB ${jobName(j)}`), "CPU s/10k I/Os", i, r, j, per10k);
    }
    await set.measure(name(RSS_FIGURE), "MiB", i, () => Promise.resolve(r.meter.lastRss().beyondGuestRam));
    // Without the binary's and libraries' pages (shared with every process running them).
    await set.measure(name(RSS_LESS_FILES), "MiB", i, () => {
      const m = r.meter.lastRss();
      return Promise.resolve(m.beyondGuestRam - m.files);
    });
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
  await removeBenchInitrds();
  return set.figures();
}
