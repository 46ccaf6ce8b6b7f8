import { ok } from "node:assert/strict";
import { cpuTimes, statTimes, threadCpu } from "./vmm_cost.ts";

/** CPU seconds this thread has used so far (/proc/thread-self/stat: user + system). */
function ownCpu(): number {
  return statTimes(Deno.readTextFileSync("/proc/thread-self/stat")).cpu;
}

// A Worker that burns `seconds` of its own CPU time, then says so.
const WORKER = `
const own = () => {
  const s = Deno.readTextFileSync("/proc/thread-self/stat");
  const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) / 100;
};
self.onmessage = (e) => {
  const end = own() + e.data;
  let x = 0;
  while (own() < end) for (let i = 0; i < 100000; i++) x += i;
  self.postMessage(x);
};
`;

/**
 * Spins 0.3 s of CPU on this thread while a Worker spins 0.5 s, and returns what threadCpu and
 * cpuTimes saw change. Run as a program (`deno run`): under `deno test` the test's code is not
 * on the process's main thread, as it is in the bench.
 */
async function measure(): Promise<{ main: number; rest: number; vcpu: number; total: number }> {
  const url = URL.createObjectURL(new Blob([WORKER], { type: "text/javascript" }));
  const w = new Worker(url, { type: "module" });
  try {
    const before = threadCpu("self", cpuTimes("self"));
    const total0 = cpuTimes("self").total;
    const done = new Promise((r) => (w.onmessage = r));
    w.postMessage(0.5);
    const end = ownCpu() + 0.3;
    let x = 0;
    while (ownCpu() < end) for (let i = 0; i < 100000; i++) x += i;
    await done;
    const after = threadCpu("self", cpuTimes("self"));
    // The times are whole clock ticks (10 ms): differences rounded to the tick, not 0.4999...
    const ticks = (s: number) => Math.round(s * 100) / 100;
    return {
      main: ticks(after.main - before.main),
      rest: ticks(after.rest - before.rest),
      vcpu: ticks(after.vcpu - before.vcpu),
      total: ticks(cpuTimes("self").total - total0),
    };
  } finally {
    w.terminate();
    URL.revokeObjectURL(url);
  }
}

if (import.meta.main) {
  console.log(JSON.stringify(await measure()));
} else {
  Deno.test("bench cost: a thread's CPU time is put under its kind (main thread, other threads, no vCPU)", async () => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL(import.meta.url).pathname],
      stdout: "piped",
    }).output();
    ok(out.success, "the measuring program ran");
    const { main, rest, vcpu, total } = JSON.parse(new TextDecoder().decode(out.stdout));
    ok(main >= 0.3 && main < 0.5, `the main thread's 0.3 s spin counted as main: ${main}`);
    ok(rest >= 0.5, `the Worker's 0.5 s spin counted as another thread's: ${rest}`);
    ok(vcpu === 0, `no thread has guest time, so no vCPU time: ${vcpu}`);
    ok(Math.abs(main + rest + vcpu - total) < 0.05, `the kinds add up to the process's time: ${total}`);
  });
}
