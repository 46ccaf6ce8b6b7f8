/**
 * Runs inside the nested runner's L1 VM against L1's real KVM: the tiny-guest cases when
 * asked (where the host has no usable /dev/kvm), then the full-boot cases, one
 * "TSVMM-RESULT {json}" line per case on the serial console.
 *
 * A full-boot case that fails runs once more: QEMU's emulated SVM occasionally leaves an
 * L2 vCPU stuck in a boot that otherwise passes (README, Known problems). A pass on the
 * second attempt carries the first failure in `retriedAfter`, and the test prints it as
 * RETRIED; a second failure fails the case. Tiny-guest cases run once.
 *
 * This L1 is given up ("TSVMM-L1-ABANDON {reason}", exit 3) when an attempt does not end
 * within ATTEMPT_LIMIT_MS, or when a VM's vCPU thread ignored its stop and may still hold one
 * of L1's two CPUs (`vcpuThreadsLeftRunning`): the host runs the cases left, that one included,
 * in a fresh L1.
 */

import { BOOT_CASES } from "../boot/cases.ts";
import { TINY_CASES } from "../vmm/tiny_guest_cases.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";
import { vcpuThreadsLeftRunning } from "../../vmm/vcpus.ts";

/**
 * The longest one attempt may take. Every case bounds its own waits (the longest, the
 * virtio-net case, at 19 minutes); an attempt still running after this awaits something that
 * will never come.
 */
const ATTEMPT_LIMIT_MS = 20 * 60_000;
/** What an attempt past ATTEMPT_LIMIT_MS is rejected with (no case can throw it). */
const OVERDUE = Symbol("overdue");

/** One result line's payload. */
export interface CaseResult {
  /** Case name. */
  name: string;
  /** Passed. */
  ok: boolean;
  /** Wall time in L1. */
  ms: number;
  /** Failure text. */
  error?: string;
  /** The first attempt's failure, when the case passed only on its second attempt. */
  retriedAfter?: string;
}

/** What the runner hands over (a file, so no shell splits it). */
interface L1Args {
  /** Regex source selecting cases; a leading "+" asks for the guests' consoles live. */
  filter: string;
  /** Run the tiny-guest cases too. */
  tiny: boolean;
}

const assets: GuestAssets = JSON.parse(await Deno.readTextFile(Deno.env.get("TSVMM_GUEST_ASSETS")!));
const raw = Deno.args[0] ? (await Deno.readTextFile(Deno.args[0])).trim() : "";
const args: L1Args = raw.startsWith("{") ? JSON.parse(raw) : { filter: raw, tiny: false };
let filterText = args.filter;
if (filterText.startsWith("+")) {
  Deno.env.set("TSVMM_ECHO_CONSOLE", "1");
  filterText = filterText.slice(1);
}
const filter = filterText ? new RegExp(filterText) : undefined;

function abandon(reason: string): never {
  console.log(`TSVMM-L1-ABANDON ${JSON.stringify({ reason })}`);
  Deno.exit(3);
}

interface Attempt {
  ms: number;
  error?: string;
}

async function attempt(name: string, run: () => Promise<void>): Promise<Attempt> {
  const t = performance.now();
  const stuckBefore = vcpuThreadsLeftRunning();
  let limit: ReturnType<typeof setTimeout> | undefined;
  const overdue = new Promise<never>((_, reject) =>
    limit = setTimeout(() => reject(OVERDUE), ATTEMPT_LIMIT_MS)
  );
  let error: string | undefined;
  try {
    await Promise.race([run(), overdue]);
  } catch (e) {
    if (e === OVERDUE) {
      abandon(`"${name}" did not end within ${ATTEMPT_LIMIT_MS / 60_000} minutes`);
    }
    error = String((e as Error).message ?? e);
  } finally {
    clearTimeout(limit);
  }
  const stuck = vcpuThreadsLeftRunning() - stuckBefore;
  if (stuck > 0 && error) {
    abandon(`"${name}" failed and ${stuck} of its vCPU thread(s) did not stop:\n${error.slice(0, 3000)}`);
  }
  return { ms: Math.round(performance.now() - t), error };
}

// A heartbeat: the host tells a frozen L1 (no line at all) from a long case by its silence.
setInterval(() => console.log("TSVMM-L1-ALIVE"), 15_000);

const cases = [
  ...(args.tiny ? TINY_CASES.map((c) => ({ name: c.name, run: () => c.run(), retry: false })) : []),
  ...BOOT_CASES.map((c) => ({ name: c.name, run: () => c.run(assets), retry: true })),
];
for (const c of cases) {
  if (filter && !filter.test(c.name)) continue;
  const first = await attempt(c.name, c.run);
  let r: CaseResult;
  if (!first.error) {
    r = { name: c.name, ok: true, ms: first.ms };
  } else if (!c.retry) {
    r = { name: c.name, ok: false, ms: first.ms, error: first.error };
  } else {
    console.log(`TSVMM-RETRY ${JSON.stringify({ name: c.name, error: first.error.slice(0, 2000) })}`);
    const second = await attempt(c.name, c.run);
    r = second.error
      ? {
        name: c.name,
        ok: false,
        ms: first.ms + second.ms,
        error: `failed twice; first:\n${first.error}\n--- second attempt ---\n${second.error}`,
      }
      : { name: c.name, ok: true, ms: first.ms + second.ms, retriedAfter: first.error };
  }
  console.log("TSVMM-RESULT " + JSON.stringify(r));
  if (vcpuThreadsLeftRunning() > 0) {
    abandon(`a vCPU thread of "${c.name}" did not stop (${vcpuThreadsLeftRunning()} so far in this L1)`);
  }
}
Deno.exit(0);
