/**
 * `deno task bench`: the vCPU exit round trip beside the C floor, boot time and device
 * throughput of tsvmm and QEMU side by side. Each figure is taken where a KVM can take
 * it: exits on this host's /dev/kvm when it can be opened (PVM included), else inside the
 * nested runner's L1; boots and devices natively where this host's KVM runs stock
 * kernels, else in L1. Every value is printed as it is measured, with where it was taken;
 * a run that fails or hangs is reported with its console tail (and, for ours, the
 * hung-guest report) and the bench goes on; it exits 1 naming every figure it could not
 * take.
 *
 * TSVMM_BENCH_RUNS (boot runs, default 5), TSVMM_BENCH_DEVICE_RUNS (device, network and scale
 * runs, default 3), TSVMM_BENCH_PARTS (default "exits,boot,devices,net"; "scale" adds the scale
 * curves, tests/bench/scale_bench.ts; "split" where a virtio-rng request's time goes, traced by
 * the kernel that runs KVM, tests/bench/split_bench.ts), TSVMM_BENCH_VM_TIMEOUT_S (default 300),
 * TSVMM_BENCH_TRANSPORTS (the device and network bench's transports, default
 * "pci,pci-legacy,mmio"), TSVMM_BENCH_SCALE_TRANSPORTS (default "pci,mmio"), TSVMM_BENCH_FIO_S
 * (seconds per fio job, default 5). The network part (iperf3, ping) runs where its TAPs may
 * live: in L1, or natively in a network namespace of its own (tests/bench/net_bench.ts).
 */

import { type BenchFigure, type BenchSink, bootBench, median } from "./boot_bench.ts";
import { COST_UNITS, deviceBench, deviceFigureNames } from "./device_bench.ts";
import { scaleBench, scaleFigureNames, scaleTables } from "./scale_bench.ts";
import { splitBench, splitFigureNames } from "./split_bench.ts";
import { netFigureNames } from "./net_bench.ts";
import { buildExitFloor, exitFloor, exitRoundTrip } from "./exit_bench.ts";
import { hostKvmRunsStockKernels, hostKvmUsable, nestedUnavailable, runNested } from "../nested/runner.ts";
import { buildGuest } from "../../vmm/guest/build.ts";
import { buildToolsDisk } from "../../vmm/guest/tools_disk.ts";
import { sysGetAffinity } from "../../vmm/sys/libc.ts";

const runs = Number(Deno.env.get("TSVMM_BENCH_RUNS") ?? "5");
const deviceRuns = Number(Deno.env.get("TSVMM_BENCH_DEVICE_RUNS") ?? "3");
const parts = (Deno.env.get("TSVMM_BENCH_PARTS") ?? "exits,boot,devices,net").split(",");
const fmt = (x: number) => (x < 1 ? x.toFixed(3) : x.toFixed(1)).padStart(8);

type Placed = BenchFigure & { where: string };
const figures: Placed[] = [];
const missing: string[] = [];
const sinkAt = (where: string): BenchSink => ({
  value: (name, v, unit) => console.log(`  ${name} [${where}]: ${fmt(v)} ${unit}`),
  missing: (name, why) => {
    missing.push(`${name} [${where}]`);
    console.error(`MISSING ${name} [${where}]:\n${why}\n`);
  },
});

const HERE = "this host's /dev/kvm";
const HERE_KVM = "this host's KVM";

/** The exit figures' names (ours by port I/O and by MMIO, then the C floor) at `at`. */
function exitFigureNames(at: string, pinned: boolean): [string, string, string] {
  const how = `${at}, ${pinned ? "pinned" : "unpinned"}`;
  return [
    `vCPU exit round trip, pio (${how})`,
    `vCPU exit round trip, mmio (${how})`,
    `C floor: the same pio loop in a C VMM (${how})`,
  ];
}
const L1 = "nested L1 (QEMU TCG, emulated SVM)";
const kvmHere = hostKvmUsable();
const native = hostKvmRunsStockKernels();
const tmp = await Deno.makeTempDir({ prefix: "tsvmm-bench-" });
let floor: string | undefined;
let floorError: string | undefined;
if (parts.includes("exits")) {
  try {
    floor = await buildExitFloor(tmp);
  } catch (e) {
    floorError = (e as Error).message;
  }
}

/**
 * The exit round trip on this host's KVM in two configurations, each beside the C floor run
 * the same way: pinned (our vCPU thread on a CPU of its own and every other thread on the
 * first, as in the device figures; the C program on the vCPU's CPU) and unpinned. The rounds
 * of ours and of the floor alternate, so a drift of the host moves both.
 */
async function exitsHere(): Promise<void> {
  const sink = sinkAt(HERE);
  console.log(`== vCPU exit round trip (guest write -> device -> resume) on ${HERE}`);
  const round = (x: number) => Math.round(x * 100) / 100;
  // pinVcpus puts vCPU 0 on the second CPU this process may use.
  const vcpuCpu = sysGetAffinity()[1];
  for (const pinned of [true, false]) {
    if (pinned && vcpuCpu === undefined) {
      for (const name of exitFigureNames(HERE_KVM, true)) sink.missing(name, "fewer than 2 CPUs to pin to");
      continue;
    }
    const [pio, mmio, cFloor] = exitFigureNames(HERE_KVM, pinned);
    const runs = new Map<string, number[]>([[pio, []], [mmio, []], [cFloor, []]]);
    const failed = new Set<string>();
    const take = async (name: string, f: () => Promise<number[]>) => {
      if (failed.has(name)) return;
      try {
        const [v] = await f();
        runs.get(name)!.push(v);
        sink.value(name, v, "us/exit");
      } catch (e) {
        failed.add(name);
        sink.missing(name, (e as Error).message);
      }
    };
    for (let r = 0; r < 5; r++) {
      await take(cFloor, () => {
        if (!floor) throw new Error(floorError);
        return exitFloor(floor, 20_000, 1, 120_000, pinned ? vcpuCpu : undefined);
      });
      await take(pio, () => exitRoundTrip("pio", 20_000, 1, 120_000, undefined, pinned));
      await take(mmio, () => exitRoundTrip("mmio", 20_000, 1, 120_000, undefined, pinned));
    }
    for (const [name, r] of runs) {
      if (failed.has(name)) continue;
      figures.push({ name, unit: "us/exit", runs: r.map(round), median: round(median(r)), where: HERE });
    }
  }
}

if (parts.includes("exits")) {
  if (kvmHere) await exitsHere();
  else {console.log(
      "== no usable /dev/kvm here: the exit round trip is measured inside the nested runner's L1",
    );}
}

const wantL1Exits = parts.includes("exits") && !kvmHere;
const wantTools = parts.includes("devices") || parts.includes("net") || parts.includes("scale");
const wantVms = parts.includes("boot") || parts.includes("split") || wantTools;
if (native && wantVms) {
  const sink = sinkAt(HERE);
  const g = await buildGuest({ quiet: true });
  if (wantTools) {
    g.toolsImage = (await buildToolsDisk({ quiet: true })).image;
  }
  console.log(`\n== boot to /init and devices on ${HERE}, ${runs} boot runs, ${deviceRuns} device runs`);
  const got: BenchFigure[] = [];
  if (parts.includes("boot")) got.push(...await bootBench(g, runs, sink));
  if (parts.includes("devices")) got.push(...await deviceBench(g, deviceRuns, sink));
  if (parts.includes("scale")) got.push(...await scaleBench(g, deviceRuns, sink));
  if (parts.includes("split")) got.push(...await splitBench(g, deviceRuns, sink));
  figures.push(...got.map((f) => ({ ...f, where: HERE })));
  if (parts.includes("net")) {
    // TAPs only in a network namespace of its own: net_bench.ts re-runs itself under unshare.
    const where = `${HERE}, own network namespace`;
    const netSink = sinkAt(where);
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL("./net_bench.ts", import.meta.url).pathname, String(deviceRuns)],
      stdout: "piped",
    }).spawn();
    for (const line of (await new Response(child.stdout).text()).split("\n")) {
      const i = line.indexOf("TSVMM-BENCH ");
      if (i < 0) continue;
      const b = JSON.parse(line.slice(i + "TSVMM-BENCH ".length));
      if (typeof b.value === "string") netSink.value(b.value, Number(b.v), String(b.unit));
      else if (typeof b.missing === "string") netSink.missing(b.missing, String(b.why));
      else if (b.figure) figures.push({ ...(b.figure as BenchFigure), where });
    }
    await child.status;
  }
} else if (wantVms || wantL1Exits) {
  const why = nestedUnavailable();
  if (why) {
    missing.push(`everything that needs the nested runner: ${why}`);
  } else {
    const sink = sinkAt(L1);
    console.log(`\n== inside the nested runner's L1 (QEMU TCG, emulated SVM): ${parts.join(", ")}`);
    console.log("   Nested-emulated figures: compare the ratios, not the times, with hardware.");
    const l1Parts = parts.filter((p) => p !== "exits" || wantL1Exits);
    const run = await runNested({
      program: {
        script: "tests/bench/l1_bench.ts",
        args: JSON.stringify({
          runs,
          deviceRuns,
          parts: l1Parts,
          exits: wantL1Exits,
          floor: floor ? "/usr/bin/exit_floor" : undefined,
          floorError,
          vmTimeoutS: Deno.env.get("TSVMM_BENCH_VM_TIMEOUT_S"),
          transports: Deno.env.get("TSVMM_BENCH_TRANSPORTS"),
          deviceThread: Deno.env.get("TSVMM_DEVICE_THREAD"),
          mmioRegisterPages: Deno.env.get("TSVMM_MMIO_REGISTER_PAGES"),
          rehearse: Deno.env.get("TSVMM_REHEARSE"),
          scaleTransports: Deno.env.get("TSVMM_BENCH_SCALE_TRANSPORTS"),
          fioSeconds: Deno.env.get("TSVMM_BENCH_FIO_S"),
        }),
        withQemu: wantVms,
        withTools: wantTools,
        extraFiles: floor ? [["/usr/bin/exit_floor", floor]] : [],
      },
      timeoutMs: 60 * 60_000,
      echo: Deno.env.get("TSVMM_ECHO_L1") === "1",
      onBench: (b) => {
        if (typeof b.value === "string") sink.value(b.value, Number(b.v), String(b.unit));
        else if (typeof b.missing === "string") sink.missing(b.missing, String(b.why));
        else if (b.figure) figures.push({ ...(b.figure as BenchFigure), where: L1 });
      },
    });
    if (!run.completed) {
      sink.missing("the rest of the L1 bench (L1 did not finish)", `--- L1 console tail ---\n${run.tail}`);
    }
  }
}
await Deno.remove(tmp, { recursive: true });

// Every figure asked for, measured at least once?
const expected: string[] = [];
if (parts.includes("exits")) {
  if (kvmHere) expected.push(...exitFigureNames(HERE_KVM, true), ...exitFigureNames(HERE_KVM, false));
  else {
    expected.push(
      "vCPU exit round trip, pio (L1's KVM)",
      "vCPU exit round trip, mmio (L1's KVM)",
      "C floor: the same pio loop in a C VMM (L1's KVM)",
    );
  }
}
if (parts.includes("boot")) {
  expected.push(
    "tsvmm API: createVm -> /init marker (1 vCPU)",
    "tsvmm CLI: process start -> /init marker (1 vCPU)",
    "QEMU microvm: process start -> /init marker (1 vCPU)",
  );
}
if (parts.includes("devices")) expected.push(...deviceFigureNames(true));
if (parts.includes("net")) expected.push(...netFigureNames());
if (parts.includes("scale")) expected.push(...scaleFigureNames());
if (parts.includes("split")) expected.push(...splitFigureNames());
for (const name of expected) {
  if (!figures.some((f) => f.name === name)) missing.push(`${name} (no run succeeded)`);
}

// Each tsvmm figure beside its peer (QEMU's figure of the same kind, or the C floor), with the ratio.
console.log("\n== figures (medians)");
const bootQemu = figures.find((f) => f.name.startsWith("QEMU microvm"));
for (const f of figures) {
  const isBoot = f.name.includes("/init marker");
  // Times (boots, ping round trips) compare as "x QEMU's time", costs (CPU, RSS) as "x QEMU's
  // cost", the rest as rates.
  const isTime = isBoot || f.unit === "ms" || f.unit === "us";
  const isCost = COST_UNITS.includes(f.unit);
  const isExit = f.name.startsWith("vCPU exit");
  const peer = isBoot ? bootQemu : isExit
    // The floor taken the same way: the same "(where[, pinning])" ending.
    ? figures.find((x) => x.name.startsWith("C floor") && x.name.endsWith(f.name.slice(f.name.indexOf(" ("))))
    : figures.find((x) => x.name === f.name.replace(/^tsvmm/, "QEMU"));
  const ratio = f.name.startsWith("QEMU") || f.name.startsWith("C floor") || !peer
    ? ""
    : f.unit === "requests"
    ? `  (QEMU's: ${peer.median})`
    : isExit
    ? `  ${(f.median / peer.median).toFixed(2)}x the C floor`
    : isTime
    ? `  ${(f.median / peer.median).toFixed(2)}x QEMU's time`
    : isCost
    ? `  ${(f.median / peer.median).toFixed(2)}x QEMU's cost`
    : `  ${(f.median / peer.median).toFixed(2)}x QEMU's rate`;
  console.log(
    `${f.name.padEnd(58)} median ${fmt(f.median)} ${f.unit}${ratio}  [${f.where}]  runs: ${f.runs.join(" ")}`,
  );
}
if (parts.includes("scale")) console.log(`\n== scale curves${scaleTables(figures)}`);
if (missing.length) {
  console.error(`\nbench: ${missing.length} figure(s) or runs missing:\n- ${missing.join("\n- ")}`);
  Deno.exit(1);
}
