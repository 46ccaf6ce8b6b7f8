/**
 * What a VMM costs its host while a guest works: the CPU time of the VMM's process (every
 * thread, user and system, from /proc/PID/stat) across phases the guest marks on its console
 * (`TSVMM-PHASE start NAME` ... `TSVMM-PHASE end NAME ...`, tests/bench/bench_guest.ts), and
 * its resident memory beyond guest RAM (/proc/PID/smaps: every mapping's Rss minus that of
 * the anonymous mapping of exactly the guest's RAM size). The same reading for ours (a Deno
 * process of its own per VM, tests/bench/ours_vm.ts) and for QEMU (its process); "self" reads
 * this process (the tests).
 */

/** Clock ticks per second of /proc/PID/stat's times (USER_HZ, 100 on x86-64 Linux). */
const USER_HZ = 100;

/** A process's CPU times so far, in seconds. */
export interface CpuTimes {
  /** user + system, every thread (user time includes the time vCPU threads ran the guest). */
  total: number;
  /** The part of `total` the kernel accounted as guest time (vCPU threads in guest mode). */
  guest: number;
}

/**
 * The name and CPU times in seconds of a /proc stat line (a process's or a thread's): `cpu` is
 * user + system, `guest` the part accounted as guest time.
 */
export function statTimes(line: string): { name: string; cpu: number; guest: number } {
  // Fields after the command name, which is in parentheses and may hold spaces: state is field 3.
  const f = line.slice(line.lastIndexOf(")") + 2).split(" ");
  const at = (field: number) => Number(f[field - 3]) / USER_HZ;
  return {
    name: line.slice(line.indexOf("(") + 1, line.lastIndexOf(")")),
    cpu: at(14) + at(15),
    guest: at(43),
  };
}

/** CPU times of process `pid` ("self": this process), from /proc/PID/stat. */
export function cpuTimes(pid: number | "self"): CpuTimes {
  const t = statTimes(Deno.readTextFileSync(`/proc/${pid}/stat`));
  return { total: t.cpu, guest: t.guest };
}

/**
 * Where a process's CPU time went by kind of thread, in seconds (user + system): its vCPU
 * threads less their guest time, its main thread, and the rest (every other thread, those
 * that have exited included: the process's total less the first two).
 */
export interface ThreadCpu {
  /**
   * Threads the kernel accounted guest time to (ours: the vCPU Workers) or named `CPU n/KVM`
   * (QEMU's), less that guest time: KVM's exit handling and the VMM's own work on them.
   */
  vcpu: number;
  /** The thread whose id is the process's (ours: the VMM's main thread; QEMU's: its main loop). */
  main: number;
  /**
   * Every other thread (ours: the device thread, V8's helper threads, io_uring workers; QEMU's:
   * its I/O thread pool and the rest).
   */
  rest: number;
}

/**
 * CPU time of process `pid` by kind of thread (ThreadCpu), from /proc/PID/task/TID/stat;
 * `proc` is the process's own times, read just before.
 */
export function threadCpu(pid: number | "self", proc: CpuTimes): ThreadCpu {
  const own = pid === "self" ? Deno.pid : pid;
  let vcpu = 0;
  let main = 0;
  for (const e of Deno.readDirSync(`/proc/${own}/task`)) {
    let t: ReturnType<typeof statTimes>;
    try {
      t = statTimes(Deno.readTextFileSync(`/proc/${own}/task/${e.name}/stat`));
    } catch {
      continue; // the thread has exited: its time is in `rest`
    }
    if (Number(e.name) === own) main += t.cpu - t.guest;
    else if (t.guest > 0 || /^CPU \d+\/KVM$/.test(t.name)) vcpu += t.cpu - t.guest;
  }
  return { vcpu, main, rest: proc.total - proc.guest - vcpu - main };
}

/** Resident memory of a VMM, in MiB. */
export interface VmmRss {
  /** Every mapping's Rss. */
  total: number;
  /** Rss of the guest-RAM mapping. */
  guestRam: number;
  /** total - guestRam. */
  beyondGuestRam: number;
  /**
   * Rss of the mappings of files (the VMM's binary and libraries: pages every process running
   * them shares, from the page cache).
   */
  files: number;
}

/**
 * RSS of process `pid` beyond guest RAM: the guest RAM is the anonymous mapping of exactly
 * `memoryMiB` (the resident one, if there are several); throws, listing the large mappings,
 * if there is none.
 */
export function vmmRss(pid: number | "self", memoryMiB: number): VmmRss {
  const text = Deno.readTextFileSync(`/proc/${pid}/smaps`);
  let total = 0;
  let files = 0;
  let guestRam = -1;
  const large: string[] = [];
  let header = "";
  let size = 0;
  for (const line of text.split("\n")) {
    const kv = /^(\w+):\s+(\d+) kB/.exec(line);
    if (!kv) {
      if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) header = line;
      continue;
    }
    const kb = Number(kv[2]);
    if (kv[1] === "Size") size = kb;
    if (kv[1] !== "Rss") continue;
    total += kb;
    // "start-end perms offset dev inode [path]": anonymous is inode 0 with no path.
    const cols = header.trim().split(/\s+/);
    const anonymous = cols[4] === "0" && cols.length === 5;
    if (cols[4] !== "0" && (cols[5] ?? "").startsWith("/")) files += kb;
    if (size >= 64 * 1024) large.push(`${header.trim()} size=${size}kB rss=${kb}kB`);
    if (anonymous && size === memoryMiB * 1024) guestRam = Math.max(guestRam, kb);
  }
  if (guestRam < 0) {
    throw new Error(
      `no anonymous ${memoryMiB} MiB mapping in /proc/${pid}/smaps; large ones:\n${large.join("\n")}`,
    );
  }
  const mib = (kb: number) => kb / 1024;
  return {
    total: mib(total),
    guestRam: mib(guestRam),
    beyondGuestRam: mib(total - guestRam),
    files: mib(files),
  };
}

/** One measured phase. */
export interface PhaseCost {
  /** Host CPU seconds of the VMM's process across the phase (user + system, every thread). */
  cpu: number;
  /** The same without the time the kernel accounted as guest time. */
  cpuLessGuest: number;
  /** `cpuLessGuest` by kind of thread. */
  threads: ThreadCpu;
  /** Wall seconds between the host seeing the start and the end line. */
  wall: number;
  /** What the end line said after the phase's name (`ios=N` for fio jobs). */
  note: string;
}

const PHASE = /TSVMM-PHASE (start|end) (\S+)([^\r\n]*)\r?\n/g;

/**
 * Follows a guest's console: at each phase line the host sees, it reads the VMM's CPU times;
 * at each end line also its RSS beyond guest RAM (keeping the last).
 */
export class PhaseMeter {
  /** The phases that ended, by name. */
  readonly phases: Map<string, PhaseCost> = new Map();
  /** RSS at the last phase end, or why it could not be read. */
  rss?: VmmRss | string;
  private readonly started = new Map<string, { cpu: CpuTimes; threads: ThreadCpu; at: number }>();
  private readonly seen = new Set<string>();

  /** `pid`: the VMM's process ("self": this process); `memoryMiB`: guest RAM. */
  constructor(private readonly pid: number | "self", private readonly memoryMiB: number) {}

  /** Looks at the console text so far (all of it, or at least every line not yet seen). */
  feed(text: string): void {
    for (const m of text.matchAll(PHASE)) {
      const key = `${m[1]} ${m[2]}`;
      if (this.seen.has(key)) continue;
      this.seen.add(key);
      let cpu: CpuTimes;
      let threads: ThreadCpu;
      try {
        cpu = cpuTimes(this.pid);
        threads = threadCpu(this.pid, cpu);
      } catch {
        continue; // the process is gone
      }
      const at = performance.now();
      if (m[1] === "start") {
        this.started.set(m[2], { cpu, threads, at });
        continue;
      }
      const s = this.started.get(m[2]);
      if (!s) continue;
      this.phases.set(m[2], {
        cpu: cpu.total - s.cpu.total,
        cpuLessGuest: cpu.total - cpu.guest - (s.cpu.total - s.cpu.guest),
        threads: {
          vcpu: threads.vcpu - s.threads.vcpu,
          main: threads.main - s.threads.main,
          rest: threads.rest - s.threads.rest,
        },
        wall: (at - s.at) / 1000,
        note: m[3].trim(),
      });
      try {
        this.rss = vmmRss(this.pid, this.memoryMiB);
      } catch (e) {
        this.rss = (e as Error).message;
      }
    }
  }

  /** A phase's cost; throws naming the phase if the console never showed both its lines. */
  get(name: string): PhaseCost {
    const p = this.phases.get(name);
    if (!p) throw new Error(`no start and end line for phase ${name} on the console`);
    return p;
  }

  /** The RSS read at the last phase end; throws why it is missing. */
  lastRss(): VmmRss {
    if (typeof this.rss === "object") return this.rss;
    throw new Error(this.rss ?? "no phase ended, so no RSS was read");
  }
}
