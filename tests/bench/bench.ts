/**
 * `deno task bench`: boot time of tsvmm and QEMU side by side (nested L1 or native KVM),
 * and the vCPU exit round trip on this host's own KVM.
 */

import { type BenchFigure, bootBench, median } from "./boot_bench.ts";
import { deviceBench } from "./device_bench.ts";
import { exitRoundTrip } from "./exit_bench.ts";
import { hostKvmRunsStockKernels, nestedUnavailable, runNested } from "../nested/runner.ts";
import { buildGuest } from "../../vmm/guest/build.ts";
import { buildFioImage } from "../../vmm/guest/fio.ts";

const runs = Number(Deno.env.get("TSVMM_BENCH_RUNS") ?? "5");
const fmt = (x: number) => (x < 1 ? x.toFixed(3) : x.toFixed(1)).padStart(8);

console.log("== vCPU exit round trip on this host's /dev/kvm (guest write -> device -> resume)");
for (const kind of ["pio", "mmio"] as const) {
  const r = await exitRoundTrip(kind);
  console.log(
    `${kind.padEnd(5)} median ${fmt(median(r))} us/exit  runs: ${r.map((x) => x.toFixed(1)).join(" ")}`,
  );
}

const native = hostKvmRunsStockKernels();
let figures: BenchFigure[];
if (native) {
  console.log(`\n== boot to /init on this host's KVM, ${runs} runs each`);
  const g = await buildGuest({ quiet: true });
  g.fioImage = await buildFioImage({ quiet: true });
  const dev = await deviceBench(g, 3);
  for (const e of dev.errors) console.error(`device bench: ${e}`);
  figures = [...await bootBench(g, runs), ...dev.figures];
} else {
  const why = nestedUnavailable();
  if (why) throw new Error(`boot bench needs the nested runner: ${why}`);
  console.log(`\n== boot to /init inside the nested runner's L1 (QEMU TCG, emulated SVM), ${runs} runs each`);
  console.log("   Nested-emulated figures: compare the ratios, not the times, with hardware.");
  const run = await runNested({
    program: {
      script: "tests/bench/l1_bench.ts",
      args: JSON.stringify({ runs }),
      withQemu: true,
      withFio: true,
    },
    timeoutMs: 40 * 60_000,
    echo: Deno.env.get("TSVMM_ECHO_L1") === "1",
  });
  if (run.bench.length === 0) throw new Error(`bench failed in L1: no figures\n${run.tail}`);
  for (const b of run.bench) if ("error" in b) console.error(`bench in L1: ${b.error}`);
  figures = run.bench.filter((b) => !("error" in b)) as unknown as BenchFigure[];
}
// Each tsvmm figure beside QEMU's figure of the same kind, with the ratio.
const bootQemu = figures.find((f) => f.name.startsWith("QEMU microvm"));
for (const f of figures) {
  const isBoot = f.name.includes("/init marker");
  const peer = isBoot ? bootQemu : figures.find((x) => x.name === f.name.replace(/^tsvmm/, "QEMU"));
  const unit = isBoot ? "ms" : f.name.includes("IOPS") ? "IOPS" : "MB/s";
  const ratio = f.name.startsWith("QEMU") || !peer
    ? ""
    : isBoot
    ? `  ${(f.median / peer.median).toFixed(2)}x QEMU's time`
    : `  ${(f.median / peer.median).toFixed(2)}x QEMU's rate`;
  console.log(`${f.name.padEnd(58)} median ${fmt(f.median)} ${unit}${ratio}  runs: ${f.runs.join(" ")}`);
}
