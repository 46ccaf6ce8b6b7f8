/**
 * Runs inside the nested runner's L1: the exit round trip on L1's KVM beside the C floor
 * (when asked: the host had no /dev/kvm), then the boot and device benchmarks. Every value
 * is printed the moment it is measured, as a "TSVMM-BENCH {json}" line:
 * `{value: name, v, unit}` for one run, `{missing: name, why}` for one that could not be
 * taken, `{figure: BenchFigure}` for each median at the end of its part.
 */

import { type BenchSink, bootBench } from "./boot_bench.ts";
import type { deviceBench as DeviceBench } from "./device_bench.ts";
import type { netBench as NetBench } from "./net_bench.ts";
import type { scaleBench as ScaleBench } from "./scale_bench.ts";
import type { splitBench as SplitBench } from "./split_bench.ts";
import { exitFloor, exitRoundTrip } from "./exit_bench.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";
import { median } from "./boot_bench.ts";
import { startStallWatch } from "./stall_watch.ts";

// A main thread stuck in a loop would be silent until the whole run's timeout: say what the
// threads are doing after a minute without a timer firing.
startStallWatch(60_000);

const assets: GuestAssets = JSON.parse(await Deno.readTextFile(Deno.env.get("TSVMM_GUEST_ASSETS")!));
const opts = JSON.parse((await Deno.readTextFile(Deno.args[0])).trim() || "{}");
// The host's per-VM timeout, for the runs in here.
if (opts.vmTimeoutS) Deno.env.set("TSVMM_BENCH_VM_TIMEOUT_S", String(opts.vmTimeoutS));
// The host's transport list, read by device_bench.ts when it loads (so imported after this).
if (opts.transports) Deno.env.set("TSVMM_BENCH_TRANSPORTS", String(opts.transports));
if (opts.deviceThread) Deno.env.set("TSVMM_DEVICE_THREAD", String(opts.deviceThread));
if (opts.mmioRegisterPages) Deno.env.set("TSVMM_MMIO_REGISTER_PAGES", String(opts.mmioRegisterPages));
if (opts.rehearse !== undefined) Deno.env.set("TSVMM_REHEARSE", String(opts.rehearse));
if (opts.scaleTransports) Deno.env.set("TSVMM_BENCH_SCALE_TRANSPORTS", String(opts.scaleTransports));
if (opts.fioSeconds) Deno.env.set("TSVMM_BENCH_FIO_S", String(opts.fioSeconds));
const { deviceBench }: { deviceBench: typeof DeviceBench } = await import("./device_bench.ts");
const { netBench }: { netBench: typeof NetBench } = await import("./net_bench.ts");
const { scaleBench }: { scaleBench: typeof ScaleBench } = await import("./scale_bench.ts");
const { splitBench }: { splitBench: typeof SplitBench } = await import("./split_bench.ts");
const emit = (o: Record<string, unknown>) => console.log("TSVMM-BENCH " + JSON.stringify(o));
const sink: BenchSink = {
  value: (name, v, unit) => emit({ value: name, v, unit }),
  missing: (name, why) => emit({ missing: name, why: why.slice(-3000) }),
};
const round = (x: number) => Math.round(x * 100) / 100;
const parts: string[] = opts.parts ?? ["exits", "boot", "devices", "net"];
try {
  if (opts.exits && parts.includes("exits")) {
    for (const kind of ["pio", "mmio"] as const) {
      const name = `vCPU exit round trip, ${kind} (L1's KVM)`;
      try {
        // An exit costs about a millisecond here: fewer per round than on a host.
        const r = await exitRoundTrip(
          kind,
          opts.exitN ?? 2000,
          5,
          120_000,
          (v) => sink.value(name, v, "us/exit"),
        );
        emit({ figure: { name, unit: "us/exit", runs: r.map(round), median: round(median(r)) } });
      } catch (e) {
        sink.missing(name, String((e as Error).message));
      }
    }
    const name = "C floor: the same pio loop in a C VMM (L1's KVM)";
    try {
      if (!opts.floor) throw new Error(opts.floorError ?? "no C floor binary");
      const r = await exitFloor(opts.floor, opts.exitN ?? 2000);
      for (const v of r) sink.value(name, v, "us/exit");
      emit({ figure: { name, unit: "us/exit", runs: r.map(round), median: round(median(r)) } });
    } catch (e) {
      sink.missing(name, String((e as Error).message));
    }
  }
  if (parts.includes("boot")) {
    for (const f of await bootBench(assets, opts.runs ?? 5, sink, opts.cpus ?? 1)) emit({ figure: f });
  }
  if (parts.includes("devices")) {
    for (const f of await deviceBench(assets, opts.deviceRuns ?? 3, sink)) emit({ figure: f });
  }
  if (parts.includes("split")) {
    for (const f of await splitBench(assets, opts.deviceRuns ?? 3, sink)) emit({ figure: f });
  }
  if (parts.includes("net")) {
    // L1 has no network device (its /init sets TSVMM_NET_ISOLATED); iperf3 is the runner's wrapper.
    for (const f of await netBench(assets, opts.deviceRuns ?? 3, sink, ["iperf3"])) emit({ figure: f });
  }
  if (parts.includes("scale")) {
    for (const f of await scaleBench(assets, opts.deviceRuns ?? 3, sink)) emit({ figure: f });
  }
} catch (e) {
  sink.missing("the rest of the L1 bench", String((e as Error).stack ?? e));
}
Deno.exit(0);
