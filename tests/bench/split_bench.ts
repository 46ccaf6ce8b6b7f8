/**
 * Where a virtio-rng request's time goes, ours beside QEMU's, seen from the kernel that runs
 * KVM (the nested runner's L1, or this host where it runs the VMs itself): the guest reads
 * 16 KiB from /dev/hwrng (256 requests of 64 bytes, each waiting for the one before) while
 * that kernel's tracer records KVM's exits, entries and interrupt deliveries and the
 * scheduler's wake-ups and switches. Per request:
 *
 * - `notify exit -> VMM thread woken`: the guest's doorbell write exits to KVM, which
 *   signals the ioeventfd (ours) or exits to the VMM; the first thread of the VMM's
 *   process woken after it is the one that serves the queue;
 * - `woken -> running`: the scheduler's delay before that thread runs;
 * - `running -> interrupt accepted`: the VMM's work until KVM's local APIC accepts the
 *   device's vector (the irqfd write or KVM_IRQ_LINE, and any thread it takes on the way);
 * - `interrupt -> guest entry`: until the vCPU enters the guest with it (waking the vCPU
 *   first if the guest had halted: `halted` counts those requests);
 * - `guest: entry -> next notify`: the guest's handler, its exits on the way (virtio-MMIO
 *   reads and acknowledges InterruptStatus), waking the reader and its next request;
 * - `cycle`: from one notify exit to the next.
 *
 * Each figure is the median over the requests of one VM run, in microseconds. It needs root
 * and the kernel's tracefs (mounted here if it is not).
 */

import type { GuestAssets } from "../../vmm/guest/build.ts";
import { type BenchFigure, type BenchSink, FigureSet, median } from "./boot_bench.ts";
import { ddScript } from "./bench_guest.ts";
import { BENCH_TRANSPORTS } from "./device_bench.ts";
import { runOurs, runQemu } from "./bench_vms.ts";

const TRACING = "/sys/kernel/tracing";
const EVENTS = [
  "kvm/kvm_exit",
  "kvm/kvm_entry",
  "kvm/kvm_fast_mmio",
  "kvm/kvm_apic_accept_irq",
  "kvm/kvm_vcpu_wakeup",
  "sched/sched_wakeup",
  "sched/sched_switch",
];

/** The spans, in the order a request goes through them. */
export const SPANS = [
  "notify exit -> VMM thread woken",
  "woken -> running",
  "running -> interrupt accepted",
  "interrupt -> guest entry",
  "guest: entry -> next notify",
  "cycle",
] as const;

// The guest program: after a warm-up read, the measured read between two marker lines the
// host watches for to switch its tracer on and off.
const SCRIPT = ddScript(1).split("phase start seq_read")[0] + `
dd if=/dev/hwrng of=/dev/null bs=64 count=8 2>/dev/null
echo TSVMM-SPLIT-START
sleep 1
dd if=/dev/hwrng of=/dev/null bs=4096 count=4 iflag=fullblock 2>/dev/null
echo TSVMM-SPLIT-END
echo "TSVMM-BENCH-DONE"
poweroff -f
`;

/** One trace line's fields. */
export interface TraceEvent {
  /** Thread id. */
  tid: number;
  /** Time in us. */
  us: number;
  /** Event name. */
  event: string;
  /** The rest of the line. */
  detail: string;
}

/** Parses the tracer's text output (`comm-tid [cpu] flags time: event: detail`). */
export function parseTrace(text: string): TraceEvent[] {
  const out: TraceEvent[] = [];
  const re = /^\s*.+?-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+): (.*)$/;
  for (const line of text.split("\n")) {
    const m = re.exec(line);
    if (m) out.push({ tid: Number(m[1]), us: Number(m[2]) * 1e6, event: m[3], detail: m[4] });
  }
  return out;
}

/** What one run's trace says, per span: every request's value in us, and the counts. */
export interface Split {
  /** Each span's values, one per request that went through it. */
  spans: Record<(typeof SPANS)[number], number[]>;
  /** Requests in which the vCPU had halted before the interrupt came. */
  halted: number;
  /** The doorbell's guest physical address and the device's vector, as found. */
  notify: string;
  /** The vector. */
  vector: string;
}

/**
 * Splits the requests in `events` (one VM's rng read): `vmmTids` are the VMM's threads,
 * `mmio` says the doorbell is a virtio-MMIO QueueNotify (offset 0x50 in its window).
 */
export function splitRequests(events: TraceEvent[], vmmTids: Set<number>, mmio: boolean): Split {
  // The doorbell: the guest address of the most frequent MMIO exit (on virtio-MMIO, the one at
  // QueueNotify; InterruptStatus and InterruptACK are as frequent there).
  const gpaOf = (e: TraceEvent): string | undefined => {
    if (e.event === "kvm_fast_mmio") return /gpa (0x[0-9a-f]+)/.exec(e.detail)?.[1];
    if (e.event !== "kvm_exit") return undefined;
    const m = /reason (\S+) .*info2 (0x[0-9a-f]+)/.exec(e.detail);
    return m && m[1] === "npf" ? m[2] : undefined;
  };
  const counts = new Map<string, number>();
  let vcpu = -1;
  for (const e of events) {
    if (e.event === "kvm_exit") vcpu = e.tid;
    const g = gpaOf(e);
    if (g) counts.set(g, (counts.get(g) ?? 0) + 1);
  }
  const ranked = [...counts].sort((a, b) => b[1] - a[1]).map(([g]) => g);
  const notify = (mmio ? ranked.find((g) => (parseInt(g, 16) & 0x1ff) === 0x50) : ranked[0]) ?? "";
  const walk = (vector?: string) => {
    const spans = Object.fromEntries(SPANS.map((s) => [s, [] as number[]])) as Split["spans"];
    const vectors = new Map<string, number>();
    let halted = 0;
    let t0 = -1, t1 = -1, t2 = -1, t3 = -1, last = -1, lastEntry = -1, woken = -1;
    for (const e of events) {
      if (gpaOf(e) === notify && notify) {
        if (last >= 0) spans.cycle.push(e.us - last);
        if (lastEntry >= 0) spans["guest: entry -> next notify"].push(e.us - lastEntry);
        t0 = last = e.us;
        t1 =
          t2 =
          t3 =
          lastEntry =
          woken =
            -1;
        continue;
      }
      if (t0 < 0) continue;
      if (t1 < 0 && e.event === "sched_wakeup") {
        const tid = Number(/pid=(\d+)/.exec(e.detail)?.[1]);
        if (tid !== vcpu && vmmTids.has(tid)) {
          t1 = e.us;
          woken = tid;
          spans["notify exit -> VMM thread woken"].push(t1 - t0);
        }
      } else if (t1 >= 0 && t2 < 0 && e.event === "sched_switch" && e.detail.includes(`next_pid=${woken} `)) {
        t2 = e.us;
        spans["woken -> running"].push(t2 - t1);
      } else if (t2 >= 0 && t3 < 0 && e.event === "kvm_apic_accept_irq") {
        const v = /vec (\d+)/.exec(e.detail)?.[1] ?? "";
        if (vector === undefined) vectors.set(v, (vectors.get(v) ?? 0) + 1);
        if (vector === undefined || v === vector) {
          t3 = e.us;
          spans["running -> interrupt accepted"].push(t3 - t2);
        }
      } else if (t3 >= 0 && lastEntry < 0 && e.event === "kvm_vcpu_wakeup") {
        halted++;
      } else if (t3 >= 0 && lastEntry < 0 && e.event === "kvm_entry" && e.tid === vcpu) {
        lastEntry = e.us;
        spans["interrupt -> guest entry"].push(lastEntry - t3);
      }
    }
    return { spans, halted, vectors };
  };
  // The device's vector: the one most often accepted first after the VMM thread ran.
  const first = walk();
  const vector = [...first.vectors].sort((a, b) => b[1] - a[1])[0]?.[0] ?? "";
  const { spans, halted } = walk(vector);
  return { spans, halted, notify, vector };
}

function tracing(file: string, value: string): void {
  Deno.writeTextFileSync(`${TRACING}/${file}`, value);
}

async function prepareTracing(): Promise<void> {
  try {
    Deno.statSync(`${TRACING}/trace`);
  } catch {
    await new Deno.Command("mount", { args: ["-t", "tracefs", "nodev", TRACING] }).output();
  }
  tracing("tracing_on", "0");
  tracing("buffer_size_kb", "16384");
  for (const e of EVENTS) tracing(`events/${e}/enable`, "1");
}

/** The threads of process `pid` now. */
function threadsOf(pid: number): number[] {
  try {
    return [...Deno.readDirSync(`/proc/${pid}/task`)].map((e) => Number(e.name));
  } catch {
    return [];
  }
}

/** The names of the figures splitBench takes. */
export function splitFigureNames(): string[] {
  return BENCH_TRANSPORTS.flatMap((t) =>
    ["tsvmm", "QEMU"].flatMap((who) => [
      ...SPANS.map((s) => `${who} ${t} rng request: ${s}`),
      `${who} ${t} rng request: vCPU halted before the interrupt (of 256)`,
    ])
  );
}

/** The request split, `runs` alternating runs of ours and QEMU per transport. */
export async function splitBench(g: GuestAssets, runs: number, sink: BenchSink): Promise<BenchFigure[]> {
  const set = new FigureSet(sink);
  try {
    await prepareTracing();
  } catch (e) {
    for (const n of splitFigureNames()) sink.missing(n, `no kernel tracer here: ${(e as Error).message}`);
    return [];
  }
  for (let i = 0; i < runs; i++) {
    for (const t of BENCH_TRANSPORTS) {
      for (const who of ["tsvmm", "QEMU"] as const) {
        const tids = new Set<number>();
        let state = 0;
        // Tracing on at the guest's start line, off at its end line; the VMM's threads taken then.
        const watch = (text: string, pid: number) => {
          if (state === 0 && text.includes("TSVMM-SPLIT-START")) {
            tracing("trace", "");
            tracing("tracing_on", "1");
            threadsOf(pid).forEach((x) => tids.add(x));
            state = 1;
          } else if (state === 1 && text.includes("TSVMM-SPLIT-END")) {
            tracing("tracing_on", "0");
            state = 2;
          }
        };
        const name = (f: string) => `${who} ${t} rng request: ${f}`;
        try {
          const vm = { script: SCRIPT, memoryMiB: 256, rng: true, watch };
          await (who === "tsvmm" ? runOurs(g, vm, t) : runQemu(g, vm, t));
          if (state !== 2) throw new Error("the guest's start and end lines were not both seen");
          const s = splitRequests(
            parseTrace(Deno.readTextFileSync(`${TRACING}/trace`)),
            tids,
            t.startsWith("mmio"),
          );
          for (const span of SPANS) {
            await set.measure(name(span), "us", i, () => {
              const xs = s.spans[span];
              if (xs.length < 128) {
                throw new Error(`only ${xs.length} requests went through "${span}" (doorbell ${s.notify})`);
              }
              return Promise.resolve(median(xs));
            });
          }
          await set.measure(
            name("vCPU halted before the interrupt (of 256)"),
            "requests",
            i,
            () => Promise.resolve(s.halted),
          );
        } catch (e) {
          sink.missing(`${who} ${t} rng request split, run ${i + 1}`, String((e as Error).message ?? e));
        } finally {
          try {
            tracing("tracing_on", "0");
          } catch { /* reported above */ }
        }
      }
    }
  }
  return set.figures();
}
