/**
 * Scale curves (TSVMM_BENCH_PARTS=scale): boot time to user space and 4 KiB random-read IOPS
 * with 1, 2 and 4 vCPUs and 1 and 4 data disks, tsvmm beside QEMU with the same configuration
 * (microvm; one request queue per disk on both; pinned the same way, tests/bench/bench_vms.ts),
 * per transport (TSVMM_BENCH_SCALE_TRANSPORTS, default "pci,mmio"). fio in the guest runs one
 * job per vCPU (`numjobs`), each at QD 32 over every data disk (`--filename` list), for
 * TSVMM_BENCH_FIO_S seconds. Boot time is from creating the VM (ours, in this process) or
 * spawning QEMU to the bench guest program's first line.
 */

import type { GuestAssets } from "../../vmm/guest/build.ts";
import type { TransportKind } from "../../vmm/config.ts";
import { type BenchFigure, type BenchSink, FigureSet } from "./boot_bench.ts";
import { removeBenchInitrds, scaleScript } from "./bench_guest.ts";
import { runOurs, runQemu } from "./bench_vms.ts";
import { fioSeconds } from "./device_bench.ts";

/** The transports the scale bench compares (TSVMM_BENCH_SCALE_TRANSPORTS, comma-separated). */
export const SCALE_TRANSPORTS: TransportKind[] = (Deno.env.get("TSVMM_BENCH_SCALE_TRANSPORTS") ?? "pci,mmio")
  .split(",").filter((t) => t) as TransportKind[];
/** vCPU counts of the curves. */
export const SCALE_CPUS: number[] = [1, 2, 4];
/** Data-disk counts of the curves. */
export const SCALE_DISKS: number[] = [1, 4];
const QD = 32;
const MEMORY_MIB = 512;

const BOOT = "scale boot to user space";
const IOPS = `scale 4 KiB randread IOPS (QD${QD} per job, a job per vCPU)`;
const configName = (cpus: number, disks: number) => `(${cpus} vCPU, ${disks} disk)`;

/** The figures scaleBench takes. */
export function scaleFigureNames(): string[] {
  return SCALE_TRANSPORTS.flatMap((t) =>
    ["tsvmm", "QEMU"].flatMap((who) =>
      SCALE_CPUS.flatMap((c) =>
        SCALE_DISKS.flatMap((
          d,
        ) => [`${who} ${t} ${BOOT} ${configName(c, d)}`, `${who} ${t} ${IOPS} ${configName(c, d)}`])
      )
    )
  );
}

/**
 * Every configuration `runs` times, ours then QEMU; values go to `sink` as they are measured
 * and a run that fails or hangs is reported there as missing while the bench goes on.
 */
export async function scaleBench(g: GuestAssets, runs: number, sink: BenchSink): Promise<BenchFigure[]> {
  const set = new FigureSet(sink);
  if (!g.toolsImage) {
    sink.missing("scale curves", "no fio tools disk");
    return [];
  }
  for (let i = 0; i < runs; i++) {
    for (const t of SCALE_TRANSPORTS) {
      for (const cpus of SCALE_CPUS) {
        for (const disks of SCALE_DISKS) {
          for (const who of ["tsvmm", "QEMU"] as const) {
            const at = `${who} ${t}`;
            const cfg = configName(cpus, disks);
            const vm = {
              script: scaleScript(fioSeconds(), QD),
              memoryMiB: MEMORY_MIB,
              cpus,
              disks,
              tools: g.toolsImage,
            };
            try {
              const r = await (who === "tsvmm" ? runOurs(g, vm, t) : runQemu(g, vm, t));
              await set.measure(`${at} ${BOOT} ${cfg}`, "ms", i, () => {
                if (r.userspaceMs < 0) throw new Error("no user-space line on the console");
                return Promise.resolve(r.userspaceMs);
              });
              await set.measure(`${at} ${IOPS} ${cfg}`, "IOPS", i, () => {
                const m = /TSVMM-CHECK scale cpus=(\d+) disks=(\d+) iops=([\d.]+)/.exec(r.text);
                if (!m || Number(m[1]) !== cpus || Number(m[2]) !== disks || !(Number(m[3]) > 0)) {
                  throw new Error(
                    `fio gave no figure for ${cfg}: ${/TSVMM-CHECK scale.*/.exec(r.text)?.[0]}`,
                  );
                }
                return Promise.resolve(Number(m[3]));
              });
            } catch (e) {
              sink.missing(`${at} scale ${cfg}, run ${i + 1}`, String((e as Error).message ?? e));
            }
          }
        }
      }
    }
  }
  await removeBenchInitrds();
  return set.figures();
}

/** The curves as small tables, one per metric and transport, from the medians in `figures`. */
export function scaleTables(figures: BenchFigure[]): string {
  const get = (name: string) => figures.find((f) => f.name === name)?.median;
  const cell = (v: number | undefined) => (v === undefined ? "-" : v.toFixed(0)).padStart(9);
  const out: string[] = [];
  for (const t of SCALE_TRANSPORTS) {
    for (const [metric, unit, lower] of [[BOOT, "ms", "time"], [IOPS, "IOPS", "rate"]]) {
      out.push(`\n${t}: ${metric}, ${unit} (medians; ratio = ours / QEMU's ${lower})`);
      out.push(`${"vCPUs".padEnd(6)}${"disks".padEnd(6)}${"tsvmm".padStart(9)}${"QEMU".padStart(9)}   ratio`);
      for (const c of SCALE_CPUS) {
        for (const d of SCALE_DISKS) {
          const ours = get(`tsvmm ${t} ${metric} ${configName(c, d)}`);
          const qemu = get(`QEMU ${t} ${metric} ${configName(c, d)}`);
          const ratio = ours !== undefined && qemu ? `${(ours / qemu).toFixed(2)}x` : "-";
          out.push(`${String(c).padEnd(6)}${String(d).padEnd(6)}${cell(ours)}${cell(qemu)}   ${ratio}`);
        }
      }
    }
  }
  return out.join("\n");
}
