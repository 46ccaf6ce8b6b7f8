/**
 * A bounded run of the fuzzer (tests/fuzz/fuzzer.ts) in the suite, with and without GC
 * pressure, and proof that its oracle catches a device that breaks the rules.
 */

import assert from "node:assert/strict";
import { type FuzzReport, runFuzz } from "./fuzzer.ts";
import { VirtioBlk } from "../../devices/virtio/blk.ts";
import type { BlockBackend } from "../../devices/virtio/blk_backend.ts";
import type { MmioRegisterFile } from "../../transports/mmio_core.ts";

const SEED = 20261201;

function summary(r: FuzzReport): string {
  return `${r.episodes} episodes, ${r.chains} chains (${r.hostileChains} hostile), ${r.registerAccesses} register accesses, ${r.resetsInFlight} resets in flight\n` +
    r.failures.map((f) => `seed ${f.seed} episode ${f.episode} (${f.target}): ${f.message}`).join("\n");
}

Deno.test("fuzz: every device on every transport holds the oracle (bounded run)", async () => {
  const r = await runFuzz({ seed: SEED, episodes: 100_000, maxChains: 15_000, maxMs: 30_000 });
  assert.deepEqual(r.failures, [], summary(r));
  assert.ok(r.chains >= 1000 && r.hostileChains > 100 && r.registerAccesses > 100, summary(r));
  assert.ok(r.resetsInFlight > 0, "some resets found disk I/O in flight");
  assert.ok(r.blkAtOnce > 100, `virtio-blk made ${r.blkAtOnce} transfers at once: both paths fuzzed`);
});

Deno.test("fuzz: GC-pressure mode (its own process, --expose-gc)", async () => {
  const main = new URL("./main.ts", import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--expose-gc", main, "--seed", String(SEED + 1), "--chains", "1500"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.match(text, /GC pressure on/);
  assert.ok(out.success && / 0 failures/.test(text), text);
});

/** A blk device whose reset does not wait for its I/O: the defect the oracle must catch. */
class ImpatientBlk extends VirtioBlk {
  override reset(): void {
    void super.reset();
  }
}

Deno.test("fuzz: the oracle catches a reset that does not wait for in-flight I/O", async () => {
  const r = await runFuzz({
    seed: SEED,
    episodes: 2000,
    maxMs: 30_000,
    devices: ["blk"],
    makeBlk: (b: BlockBackend, serial: string) => new ImpatientBlk(b, { serial }),
  });
  assert.equal(r.failures.length, 1, summary(r));
  assert.match(r.failures[0].message, /after the reset|in flight after the reset/);
});

Deno.test("fuzz: the oracle catches a virtio-MMIO register page that misses the device's own changes", async () => {
  const r = await runFuzz({
    seed: SEED,
    episodes: 2000,
    maxMs: 30_000,
    transports: ["mmio", "mmio-legacy"],
    // Kept after the driver's writes only: NEEDS_RESET set while serving a request (whose
    // notify is an ioeventfd, past the page's upkeep) never reaches the page.
    keepCopy: (file: MmioRegisterFile, words: Int32Array) => {
      const writes = file.keepCopy(words, 0);
      file.core.onChange = undefined;
      return writes;
    },
  });
  assert.equal(r.failures.length, 1, summary(r));
  assert.match(r.failures[0].message, /register page differs from the registers at 0x70/);
});
