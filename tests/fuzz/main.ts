/**
 * `deno task fuzz`: long fuzzing runs of the virtio devices and transports.
 *
 *   deno task fuzz [--seed N] [--chains N] [--episodes N] [--minutes N] [--no-gc]
 *                  [--device blk|rng] [--transport mmio|mmio-legacy]
 *   deno task fuzz --seed N --episode E [--verbose]     # replay one episode
 *
 * Prints progress and a summary; exits 1 on any failure, printing the seed and episode
 * that reproduce it.
 */

import { parseArgs } from "node:util";
import { emptyReport, type FuzzReport, runFuzz } from "./fuzzer.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    seed: { type: "string" },
    chains: { type: "string" },
    episodes: { type: "string" },
    episode: { type: "string" },
    minutes: { type: "string" },
    "no-gc": { type: "boolean" },
    device: { type: "string", multiple: true },
    transport: { type: "string", multiple: true },
    verbose: { type: "boolean" },
  },
});

function num(name: string, v: string | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) {
    console.error(`error: --${name} wants a non-negative integer, not "${v}"`);
    Deno.exit(2);
  }
  return n;
}

const seed = num("seed", values.seed, Math.floor(Math.random() * 2 ** 31));
const replay = values.episode !== undefined;
const gcPressure = !values["no-gc"] && typeof (globalThis as { gc?: unknown }).gc === "function";
const chains = num("chains", values.chains, replay ? 0 : 1_000_000);
const episodes = replay ? 1 : num("episodes", values.episodes, Number.MAX_SAFE_INTEGER);
const minutes = num("minutes", values.minutes, 0);
console.log(
  `fuzz: seed ${seed}, ${replay ? `episode ${values.episode}` : `${chains} chains`}, GC pressure ${
    gcPressure ? "on" : "off"
  }`,
);
const total: FuzzReport = emptyReport();
// Runs in slices so progress shows; the episode numbers continue across slices.
let next = replay ? num("episode", values.episode, 0) : 0;
const t0 = performance.now();
while (total.episodes < episodes && (chains === 0 || total.chains < chains) && total.failures.length === 0) {
  if (minutes && performance.now() - t0 > minutes * 60_000) break;
  const r = await runFuzz({
    seed,
    firstEpisode: next,
    episodes: Math.min(500, episodes - total.episodes),
    maxChains: chains ? chains - total.chains : undefined,
    gcPressure,
    devices: values.device,
    transports: values.transport,
    verbose: values.verbose,
  });
  next += r.episodes;
  for (
    const k of [
      "episodes",
      "chains",
      "hostileChains",
      "registerAccesses",
      "resetsInFlight",
      "blkAtOnce",
      "needsReset",
    ] as const
  ) {
    total[k] += r[k];
  }
  total.failures.push(...r.failures);
  total.maxRss = Math.max(total.maxRss, r.maxRss);
  if (!replay) {
    console.log(
      `  ${total.episodes} episodes, ${total.chains} chains (${total.hostileChains} hostile), ${total.registerAccesses} register accesses, ${total.resetsInFlight} resets with I/O in flight, ${
        Math.round((performance.now() - t0) / 1000)
      } s`,
    );
  }
}
total.ms = Math.round(performance.now() - t0);
console.log(
  `fuzz: ${total.episodes} episodes, ${total.chains} chains (${total.hostileChains} hostile), ${total.registerAccesses} register accesses, ${total.resetsInFlight} resets with I/O in flight, ${total.needsReset} NEEDS_RESET, max RSS ${
    Math.round(total.maxRss / 2 ** 20)
  } MiB, ${(total.ms / 1000).toFixed(1)} s, ${total.failures.length} failures`,
);
for (const f of total.failures) {
  console.log(`FAIL seed ${f.seed} episode ${f.episode} (${f.target}): ${f.message}`);
  console.log(`  replay: deno task fuzz --seed ${f.seed} --episode ${f.episode} --verbose`);
}
Deno.exit(total.failures.length ? 1 : 0);
