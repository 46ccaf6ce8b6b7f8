/**
 * virtio-net on a real TAP, each scenario in a network namespace of its own (`unshare -n`):
 * the TAP, its peer (the namespace's own IP stack) and every packet stay inside it, on
 * 169.254.77.0/24. The scenarios are in tests/harness/net_tap.ts.
 */

import assert from "node:assert/strict";

const SCRIPT = new URL("../harness/net_tap.ts", import.meta.url).pathname;

async function scenario(name: string): Promise<void> {
  const out = await new Deno.Command("unshare", {
    args: ["-n", Deno.execPath(), "run", "-A", SCRIPT, name],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.ok(out.success && text.includes(`scenario ${name}: ok`), `scenario ${name} failed:\n${text}`);
}

const SCENARIOS: Array<[string, string]> = [
  ["frames", "frames flow both ways, with and without mergeable receive buffers"],
  ["offloads", "the TAP's offloads follow the features the driver acknowledged"],
  ["flood", "a flooded TAP with no receive buffers costs no CPU and no memory"],
  ["toobig", "a frame larger than the posted buffers is dropped and counted, not truncated"],
  ["hostile", "hostile transmit chains are dropped and answered; receive and other devices go on"],
  ["answer", "the host's answer to a sent frame reaches the guest in the same pass, unasked"],
  ["eagain", "transmit waits out a full TAP and loses nothing"],
  ["teardown", "the VMM's teardown order (loop stopped, device reset, TAP closed) goes through"],
  ["fd", "a TAP fd handed over by a parent is adopted and made nonblocking"],
  ["warmup", "on a device thread, the device is rehearsed over a loopback first; nothing reaches the TAP"],
  ["fuzz", "a hostile driver on both queues: no crash, nothing written outside its buffers, then works"],
];

for (const [name, what] of SCENARIOS) {
  Deno.test(`net on a TAP: ${what}`, () => scenario(name));
}
