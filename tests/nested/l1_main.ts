/**
 * Runs inside the nested runner's L1 VM: the full-boot cases against L1's real KVM,
 * one "TSVMM-RESULT {json}" line per case on the serial console.
 */

import { BOOT_CASES } from "../boot/cases.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";

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

const assets: GuestAssets = JSON.parse(await Deno.readTextFile(Deno.env.get("TSVMM_GUEST_ASSETS")!));
// The case filter (a regex source) comes in a file, so no shell splits it. A leading "+"
// asks for the guests' consoles live (TSVMM_ECHO_CONSOLE).
let filterText = Deno.args[0] ? (await Deno.readTextFile(Deno.args[0])).trim() : "";
if (filterText.startsWith("+")) {
  Deno.env.set("TSVMM_ECHO_CONSOLE", "1");
  filterText = filterText.slice(1);
}
const filter = filterText ? new RegExp(filterText) : undefined;
for (const c of BOOT_CASES) {
  if (filter && !filter.test(c.name)) continue;
  const t = performance.now();
  let r: CaseResult;
  try {
    await c.run(assets);
    r = { name: c.name, ok: true, ms: Math.round(performance.now() - t) };
  } catch (e) {
    r = {
      name: c.name,
      ok: false,
      ms: Math.round(performance.now() - t),
      error: String((e as Error).message ?? e),
    };
  }
  console.log("TSVMM-RESULT " + JSON.stringify(r));
}
Deno.exit(0);
