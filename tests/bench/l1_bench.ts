/** Runs inside the nested runner's L1: the boot benchmark, one "TSVMM-BENCH {json}" line per figure. */

import { bootBench } from "./boot_bench.ts";
import { deviceBench } from "./device_bench.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";

const assets: GuestAssets = JSON.parse(await Deno.readTextFile(Deno.env.get("TSVMM_GUEST_ASSETS")!));
const opts = JSON.parse((await Deno.readTextFile(Deno.args[0])).trim() || "{}");
try {
  for (const f of await bootBench(assets, opts.runs ?? 5, opts.cpus ?? 1)) {
    console.log("TSVMM-BENCH " + JSON.stringify(f));
  }
  const dev = await deviceBench(assets, opts.deviceRuns ?? 3);
  for (const f of dev.figures) console.log("TSVMM-BENCH " + JSON.stringify(f));
  for (const error of dev.errors) console.log("TSVMM-BENCH " + JSON.stringify({ error }));
} catch (e) {
  console.log("TSVMM-BENCH " + JSON.stringify({ error: String((e as Error).message) }));
}
Deno.exit(0);
