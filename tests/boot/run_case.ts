/**
 * Runs one boot case by its exact name (the first argument) with the default guest, and exits
 * 0 if it passed, 1 with the failure on stderr if not. The network cases run themselves this
 * way under `unshare --net` where they are not inside the nested runner's L1.
 */

import { BOOT_CASES } from "./cases.ts";
import { buildGuest, type GuestAssets } from "../../vmm/guest/build.ts";

const c = BOOT_CASES.find((x) => x.name === Deno.args[0]);
if (!c) {
  console.error(`no boot case named "${Deno.args[0]}"`);
  Deno.exit(2);
}
const assetsFile = Deno.env.get("TSVMM_GUEST_ASSETS");
const guest: GuestAssets = assetsFile
  ? JSON.parse(await Deno.readTextFile(assetsFile))
  : await buildGuest({ quiet: true });
try {
  await c.run(guest);
} catch (e) {
  console.error(String((e as Error).message ?? e));
  Deno.exit(1);
}
Deno.exit(0);
