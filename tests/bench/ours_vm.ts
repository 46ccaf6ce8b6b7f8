/**
 * One bench VM of ours in a process of its own, as a user's `deno task run` has it, so the
 * CPU time and memory the bench reads for it are the VMM's and not the bench's own
 * (tests/bench/bench_vms.ts `runOurs` starts it, and measures it as it measures QEMU).
 *
 * Its argument is JSON: `{config: VmConfig, timeoutMs}`. It writes the guest's console to
 * stdout as it comes and, once the VM has ended, the device report after a `[devices]` line
 * (REPORT_MARK). It exits 0 when the VM ran to its end, else 1 with why (and the hung-guest
 * report) on stderr. Bench consoles are small: the console is relayed from `consoleText`,
 * which keeps the last MiB.
 */

import { bootTest, type VmConfig } from "../../mod.ts";
import { deviceReport, REPORT_MARK } from "./bench_vms.ts";

const { config, timeoutMs } = JSON.parse(Deno.args[0]) as { config: VmConfig; timeoutMs: number };
const enc = new TextEncoder();

function writeAll(bytes: Uint8Array): void {
  for (let at = 0; at < bytes.length;) at += Deno.stdout.writeSync(bytes.subarray(at));
}

let sent = 0;
function relay(text: string): void {
  if (text.length > sent) writeAll(enc.encode(text.slice(sent)));
  sent = text.length;
}

try {
  await bootTest(config, async (vm) => {
    let ended = false;
    const end = vm.wait().then(() => ended = true);
    while (!ended) {
      relay(vm.consoleText);
      await Promise.race([vm.nextOutput(), end]);
    }
    relay(vm.consoleText);
    writeAll(enc.encode(`${REPORT_MARK}${deviceReport(vm).join("\n")}\n`));
  }, timeoutMs);
} catch (e) {
  console.error((e as Error).stack ?? String(e));
  Deno.exit(1);
}
Deno.exit(0);
