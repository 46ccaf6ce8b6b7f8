/**
 * A watchdog for long runs in one process (the L1 bench): a Worker that notices when this
 * process's main thread stops turning its event loop (no timer has fired for `stallMs`) and
 * then prints what every thread of the process is doing (state, kernel wait channel, CPU
 * time used since the last look) and the busiest processes of the machine. A main thread
 * stuck in a synchronous loop cannot say so itself, and its timers (every VM run's timeout
 * among them) never fire, so without this such a run is silent until it is killed.
 */

const WORKER = `
let last = -1, since = Date.now(), reported = 0;
const ticks = (stat) => { const f = stat.slice(stat.lastIndexOf(")") + 2).split(" "); return Number(f[11]) + Number(f[12]); };
const read = (p) => { try { return Deno.readTextFileSync(p); } catch { return ""; } };
let prev = new Map();
// On each beat only the thread tick counts are kept (cheap), so a report shows what each
// thread used since the main thread last beat.
function threadTicks() {
  const now = new Map();
  for (const t of Deno.readDirSync("/proc/self/task")) {
    const stat = read("/proc/self/task/" + t.name + "/stat");
    if (stat) now.set(t.name, ticks(stat));
  }
  prev = now;
}
function snapshot() {
  const now = new Map();
  const lines = [];
  for (const t of Deno.readDirSync("/proc/self/task")) {
    const stat = read("/proc/self/task/" + t.name + "/stat");
    if (!stat) continue;
    const comm = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
    const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
    const used = ticks(stat);
    now.set(t.name, used);
    const wchan = read("/proc/self/task/" + t.name + "/wchan");
    lines.push(t.name + " " + comm + " " + state + " wchan=" + (wchan || "-") + " cpu_ticks+" + (used - (prev.get(t.name) ?? used)));
  }
  prev = now;
  const procs = [];
  for (const p of Deno.readDirSync("/proc")) {
    if (!/^\\d+$/.test(p.name)) continue;
    const stat = read("/proc/" + p.name + "/stat");
    if (stat) procs.push([ticks(stat), p.name + " " + stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"))]);
  }
  procs.sort((a, b) => b[0] - a[0]);
  return lines.join("\\n") + "\\nbusiest processes (total ticks): " + procs.slice(0, 6).map(([t, n]) => n + "=" + t).join(", ") +
    "\\nloadavg: " + read("/proc/loadavg").trim();
}
self.onmessage = (e) => {
  const { sab, stallMs } = e.data;
  const beat = new Int32Array(sab);
  threadTicks();
  for (;;) {
    Atomics.wait(beat, 0, Atomics.load(beat, 0), 5000);
    const b = Atomics.load(beat, 0);
    if (b !== last) { last = b; since = Date.now(); reported = 0; threadTicks(); continue; }
    if (Date.now() - since >= stallMs && Date.now() - reported >= 60000) {
      reported = Date.now();
      console.log("TSVMM-STALL main thread silent for " + Math.round((Date.now() - since) / 1000) + " s; threads of this process:\\n" + snapshot());
    }
  }
};
`;

/**
 * Starts the watchdog (the main thread's interval beats every second); returns what stops it.
 * The Worker keeps the process alive until then (or until `Deno.exit`).
 */
export function startStallWatch(stallMs = 60_000): () => void {
  const sab = new SharedArrayBuffer(4);
  const beat = new Int32Array(sab);
  const url = URL.createObjectURL(new Blob([WORKER], { type: "application/javascript" }));
  const w = new Worker(url, { type: "module" });
  w.postMessage({ sab, stallMs });
  const id = setInterval(() => Atomics.add(beat, 0, 1), 1000);
  return () => {
    clearInterval(id);
    w.terminate();
  };
}
