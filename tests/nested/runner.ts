/**
 * The nested-KVM runner: where this host's KVM cannot run stock kernels (PVM, or no
 * /dev/kvm), boot an L1 Linux under QEMU TCG with an emulated AMD CPU with SVM, load
 * the real kvm + kvm_amd there, and run the boot cases (and, where this host has no
 * usable /dev/kvm, the tiny-guest cases) inside it with our Deno and source, reading
 * results back over L1's serial console (docs/DESIGN.md, "The nested runner").
 */

import { CpioTree } from "../../vmm/guest/cpio.ts";
import { loadOrder, parseModulesBuiltin, parseModulesDep } from "../../vmm/guest/modules.ts";
import { buildGuest, type GuestAssets, userlandFiles } from "../../vmm/guest/build.ts";
import { buildToolsDisk } from "../../vmm/guest/tools_disk.ts";

const ROOT = new URL("../../", import.meta.url).pathname;
const PROJECT_DIRS = ["mod.ts", "deno.json", "vmm", "devices", "transports", "tests", "examples"];
// tun: the VMM inside L1 opens /dev/net/tun for the network cases' TAPs (L1 has no network
// device of its own; the TAPs are its only interfaces besides lo).
const L1_MODULES = ["irqbypass", "kvm", "kvm_amd", "tun"];

/**
 * Whether this host's /dev/kvm can be opened read-write (any KVM, PVM included), so the
 * tiny-guest tests run here; false with TSVMM_NESTED=1, which sends them into L1 too.
 */
export function hostKvmUsable(): boolean {
  if (Deno.env.get("TSVMM_NESTED") === "1") return false;
  try {
    Deno.openSync("/dev/kvm", { read: true, write: true }).close();
    return true;
  } catch {
    return false;
  }
}

/** Whether this host's KVM can run a stock kernel to userspace (hardware VMX/SVM, not PVM). */
export function hostKvmRunsStockKernels(): boolean {
  const forced = Deno.env.get("TSVMM_NESTED");
  if (forced === "1") return false;
  if (forced === "0") return true;
  try {
    Deno.openSync("/dev/kvm", { read: true, write: true }).close();
  } catch {
    return false;
  }
  try {
    Deno.statSync("/sys/module/kvm_pvm");
    return false;
  } catch { /* not PVM */ }
  const flags = Deno.readTextFileSync("/proc/cpuinfo").match(/^flags\s*:(.*)$/m)?.[1] ?? "";
  return /\b(vmx|svm)\b/.test(flags);
}

/** Why the nested runner cannot run here, or undefined if it can. */
export function nestedUnavailable(): string | undefined {
  for (const bin of ["qemu-system-x86_64"]) {
    try {
      new Deno.Command("sh", { args: ["-c", `command -v ${bin}`] }).outputSync().success || (() => {
        throw 0;
      })();
    } catch {
      return `${bin} is not installed (apt-get install qemu-system-x86)`;
    }
  }
  return undefined;
}

function hostTscKhz(): number {
  const m = /cpu MHz\s*:\s*([\d.]+)/.exec(Deno.readTextFileSync("/proc/cpuinfo"));
  return m ? Math.round(Number(m[1]) * 1000) : 2_000_000;
}

async function walk(path: string, rel: string, out: Array<[string, string]>): Promise<void> {
  const st = await Deno.stat(path);
  if (st.isFile) {
    out.push([rel, path]);
    return;
  }
  const names: string[] = [];
  for await (const e of Deno.readDir(path)) names.push(e.name);
  for (const n of names.sort()) await walk(`${path}/${n}`, `${rel}/${n}`, out);
}

/** Shared libraries a binary needs, from ldd: [path inside L1, host path]. */
async function sharedLibs(binary: string): Promise<Array<[string, string]>> {
  const out = await new Deno.Command("ldd", { args: [binary], stdout: "piped" }).output();
  const libs: Array<[string, string]> = [];
  for (const line of new TextDecoder().decode(out.stdout).split("\n")) {
    const m = /=>\s*(\/\S+)/.exec(line) ?? /^\s*(\/\S+)\s+\(/.exec(line);
    if (m) libs.push([m[1].replace(/^\//, ""), await Deno.realPath(m[1])]);
  }
  return libs;
}

/** QEMU's firmware files the microvm machine needs. */
const QEMU_DATA = [
  "bios-microvm.bin",
  "qboot.rom",
  "linuxboot_dma.bin",
  "pvh.bin",
  "kvmvapic.bin",
  "multiboot_dma.bin",
];

/** What L1 runs. */
export interface L1Program {
  /** Script (relative to the project) L1 runs with Deno. */
  script: string;
  /** Text handed to the script in a file (its first argument). */
  args: string;
  /** Also put QEMU (binary, libraries, firmware) into L1. */
  withQemu?: boolean;
  /**
   * Also put the tools disk (vmm/guest/tools_disk.ts: fio, iperf3) into L1, and iperf3 itself
   * (`/usr/bin/iperf3`, the host end of the network bench).
   */
  withTools?: boolean;
  /** More files: [path inside L1, host path], made executable. */
  extraFiles?: Array<[string, string]>;
}

/** Builds the L1 initramfs: busybox, KVM modules, Deno and its libraries, the project, the guest. */
export async function buildL1Initramfs(
  guest: GuestAssets,
  program: L1Program,
): Promise<{ cpio: Uint8Array; kernel: string }> {
  const l1 = guest.kernels["6.1"];
  const root = `${guest.dir}/${l1.package}`;
  const modRoot = `${root}/lib/modules/${l1.release}`;
  const order = loadOrder(
    parseModulesDep(await Deno.readTextFile(`${modRoot}/modules.dep`)),
    L1_MODULES,
    parseModulesBuiltin(await Deno.readTextFile(`${modRoot}/modules.builtin`)),
  );
  const tree = new CpioTree();
  const addFile = async (path: string, host: string | Uint8Array, mode = 0o644) =>
    tree.file(path, typeof host === "string" ? await Deno.readFile(host) : host, mode);
  const enc = new TextEncoder();
  await addFile("init", `${ROOT}tests/nested/l1_init.sh`, 0o755);
  await addFile("bin/busybox", `${guest.dir}/busybox-static/bin/busybox`, 0o755);
  tree.symlink("bin/sh", "busybox");
  await addFile("etc/tsvmm/modules.order", enc.encode(order.join("\n") + "\n"));
  await addFile("etc/tsvmm/l1_args", enc.encode(program.args + "\n"));
  await addFile("etc/tsvmm/l1_program", enc.encode(program.script + "\n"));
  for (const m of order) await addFile(`lib/modules/${l1.release}/${m}`, `${modRoot}/${m}`);
  const deno = await Deno.realPath(Deno.execPath());
  await addFile("bin/deno", deno, 0o755);
  for (const [inside, host] of await sharedLibs(deno)) await addFile(inside, host, 0o755);
  if (guest.userland) {
    // e2fsck (and mke2fs) with their libraries, for the file-system checks on the L1 side.
    const ul = await userlandFiles(guest.userland);
    for (const [inside, file] of ul.files) await addFile(inside, file, 0o755);
    for (const [inside, target] of ul.links) tree.symlink(inside, target);
  }
  if (program.withQemu) {
    const qemu = await Deno.realPath("/usr/bin/qemu-system-x86_64");
    await addFile("usr/bin/qemu-system-x86_64", qemu, 0o755);
    for (const [inside, host] of await sharedLibs(qemu)) await addFile(inside, host, 0o755);
    for (const f of QEMU_DATA) await addFile(`usr/share/qemu/${f}`, `/usr/share/qemu/${f}`);
  }
  for (const [inside, host] of program.extraFiles ?? []) {
    await addFile(inside.replace(/^\//, ""), host, 0o755);
  }
  const files: Array<[string, string]> = [];
  for (const p of PROJECT_DIRS) {
    try {
      await walk(`${ROOT}${p}`, p, files);
    } catch { /* optional dir */ }
  }
  for (const [rel, host] of files) await addFile(`proj/${rel}`, host);
  // The guest assets, at paths L1 sees.
  const inL1: GuestAssets = { dir: "/proj/.cache/guest", kernels: {}, initramfs: "" };
  for (const [line, k] of Object.entries(guest.kernels)) {
    const base = `proj/.cache/guest/out/${k.release}`;
    await addFile(`${base}/vmlinux`, k.vmlinux);
    await addFile(`${base}/initramfs.cpio`, k.initramfs);
    await addFile(`${base}/bzImage`, k.bzImage);
    inL1.kernels[line] = {
      ...k,
      bzImage: `/${base}/bzImage`,
      vmlinux: `/${base}/vmlinux`,
      initramfs: `/${base}/initramfs.cpio`,
    };
  }
  inL1.initramfs = inL1.kernels["6.1"].initramfs;
  if (program.withTools) {
    const tools = await buildToolsDisk({ quiet: true });
    inL1.toolsImage = "/proj/.cache/guest/out/tools.ext4";
    await addFile(inL1.toolsImage.slice(1), tools.image);
    // iperf3 with its own loader and libraries, as the guest runs it from the disk.
    await addFile("opt/iperf3/iperf3", `${tools.tree}/iperf3`, 0o755);
    await addFile("opt/iperf3/ld.so", `${tools.tree}/ld.so`, 0o755);
    for (const lib of tools.libs.iperf3) await addFile(`opt/iperf3/lib/${lib}`, `${tools.tree}/lib/${lib}`);
    await addFile(
      "usr/bin/iperf3",
      enc.encode(
        '#!/bin/sh\nexec /opt/iperf3/ld.so --library-path /opt/iperf3/lib /opt/iperf3/iperf3 "$@"\n',
      ),
      0o755,
    );
  }
  await addFile("proj/.cache/guest/assets.json", enc.encode(JSON.stringify(inL1)));
  return { cpio: tree.bytes(), kernel: l1.bzImage };
}

/** A line of L1's own kernel log that starts a failure report. */
/** QEMU's warning, per L1 vCPU, for each CPU feature of the model that TCG does not emulate. */
const TCG_FEATURE_WARNING = /TCG doesn't support requested feature/;
const L1_OOPS = /^\[\s*\d+\.\d+\] (BUG:|Oops|Kernel panic|general protection fault|stack guard page)/;

/** What an L1 run produced. */
export interface L1Run {
  /** Payloads of the "TSVMM-RESULT " lines, parsed. */
  results: Array<{ name: string; ok: boolean; ms: number; error?: string; retriedAfter?: string }>;
  /** Network controllers on L1's PCI buses, as L1 counted them (undefined if it did not report). */
  l1NetDevices?: number;
  /** Payloads of the "TSVMM-BENCH " lines, parsed. */
  bench: Array<Record<string, unknown>>;
  /** Whether L1 reported completion. */
  completed: boolean;
  /** The last part of L1's console. */
  tail: string;
  /** The first lines of the first failure L1's own kernel reported (BUG, Oops, panic), if any. */
  l1Oops?: string;
  /** Wall time of the run. */
  ms: number;
  /** L1's program printed no line of its own, not even its heartbeat, for `silenceMs`, and L1 was killed. */
  frozen?: boolean;
  /** L1 ran past the run's timeout and was killed. */
  timedOut?: boolean;
  /** Why L1's program gave up on this L1 ("TSVMM-L1-ABANDON"), leaving the cases after it unrun. */
  abandoned?: string;
}

/** Options for an L1 run. */
export interface L1Options {
  /** What L1 runs (default: the boot cases). */
  program?: L1Program;
  /** Regex source selecting cases (all if empty); a leading "+" echoes the guests' consoles. */
  filter?: string;
  /** Also run the tiny-guest cases (tests/vmm/tiny_guest_cases.ts) in L1. */
  tiny?: boolean;
  /** Whole-run timeout. */
  timeoutMs?: number;
  /**
   * Kill L1 when, after its first heartbeat ("TSVMM-L1-ALIVE", every 15 s from the boot-case
   * program), its program prints no line of its own ("TSVMM-...") for this long: only a frozen
   * L1 is that quiet. L1's kernel may go on printing (a soft lockup report every 20-odd
   * seconds, say), so its lines do not count. Default: no such check.
   */
  silenceMs?: number;
  /** Print L1's console as it comes. */
  echo?: boolean;
  /** Also put QEMU into L1 (for cases that run it beside us). */
  withQemu?: boolean;
  /** Also put the tools disk (fio, iperf3) and iperf3 itself into L1. */
  withTools?: boolean;
  /** Called with each "TSVMM-BENCH" payload the moment L1 prints it. */
  onBench?: (b: Record<string, unknown>) => void;
  /**
   * L1's clock from the TSC (`tsc=reliable`) rather than the emulated HPET its kernel picks
   * (it finds the emulated CPUs' TSCs unsynchronized). Default: TSVMM_L1_TSC=1, else off.
   */
  tscClock?: boolean;
  /**
   * A gdb stub for L1's QEMU on 127.0.0.1 at this port, and L1's kernel at `loglevel=5` (a
   * warning's call trace reaches the console): to see what a frozen L1 is doing. Default:
   * TSVMM_L1_GDB, else none.
   */
  gdbPort?: number;
}

/**
 * QEMU's command line for L1: q35 under TCG with an emulated EPYC with SVM, 2 CPUs, 3 GiB,
 * its serial console on stdio, and nothing else: no default devices, no network device
 * (nothing may leave a test VM), no user config. `tscClock`: L1's clock source is the TSC.
 * `gdbPort`: a gdb stub on 127.0.0.1 at that port, and L1's kernel at `loglevel=5`.
 */
export function l1QemuArgs(kernel: string, initrd: string, tscClock = false, gdbPort?: number): string[] {
  if (gdbPort !== undefined && !(Number.isInteger(gdbPort) && gdbPort > 0 && gdbPort < 65536)) {
    throw new RangeError(`L1's gdb port must be 1-65535, not ${gdbPort}`);
  }
  return [
    "qemu-system-x86_64",
    ...["-nodefaults", "-no-user-config", "-nic", "none"],
    ...["-accel", "tcg,thread=multi", "-M", "q35", "-cpu", "EPYC,+svm", "-smp", "2", "-m", "3072"],
    ...["-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"],
    ...["-kernel", kernel, "-initrd", initrd],
    ...(gdbPort === undefined ? [] : ["-gdb", `tcp:127.0.0.1:${gdbPort}`]),
    "-append",
    `console=ttyS0 nokaslr tsc_early_khz=${hostTscKhz()}${
      tscClock ? " tsc=reliable" : ""
    } panic=-1 reboot=t quiet${gdbPort === undefined ? "" : " loglevel=5"}`,
  ];
}

/** Boots L1, runs the selected boot cases inside it, and returns their results. */
export async function runNested(opts: L1Options = {}): Promise<L1Run> {
  const t0 = performance.now();
  const guest = await buildGuest({ quiet: true });
  const program = opts.program ??
    {
      script: "tests/nested/l1_main.ts",
      args: JSON.stringify({ filter: opts.filter ?? "", tiny: opts.tiny ?? false }),
      withQemu: opts.withQemu,
      withTools: opts.withTools,
    };
  const { cpio, kernel } = await buildL1Initramfs(guest, program);
  const dir = await Deno.makeTempDir({ prefix: "tsvmm-l1-" });
  const initrd = `${dir}/l1.cpio`;
  await Deno.writeFile(initrd, cpio);
  const tsc = opts.tscClock ?? Deno.env.get("TSVMM_L1_TSC") === "1";
  const gdb = opts.gdbPort ??
    (Deno.env.get("TSVMM_L1_GDB") ? Number(Deno.env.get("TSVMM_L1_GDB")) : undefined);
  const qemu = l1QemuArgs(kernel, initrd, tsc, gdb).map((a) => `'${a}'`).join(" ");
  // A watchdog shell: QEMU dies with this process, even if this process is killed outright.
  const script = `${qemu} </dev/null & q=$!; trap 'kill -9 $q 2>/dev/null' EXIT INT TERM HUP; ` +
    `while kill -0 ${Deno.pid} 2>/dev/null && kill -0 $q 2>/dev/null; do sleep 0.5; done; kill -9 $q 2>/dev/null; wait $q`;
  const child = new Deno.Command("sh", { args: ["-c", script], stdout: "piped", stderr: "piped" }).spawn();
  const results: L1Run["results"] = [];
  const bench: L1Run["bench"] = [];
  let completed = false;
  let l1NetDevices: number | undefined;
  let tail = "";
  let l1Oops: string | undefined;
  let oopsLines = 0;
  const timeoutMs = opts.timeoutMs ?? 30 * 60_000;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGTERM");
  }, timeoutMs);
  let lastOutput = performance.now();
  let alive = false;
  let frozen = false;
  const silence = opts.silenceMs
    ? setInterval(() => {
      if (!alive || performance.now() - lastOutput < opts.silenceMs!) return;
      frozen = true;
      child.kill("SIGTERM");
    }, 5_000)
    : undefined;
  const decoder = new TextDecoder();
  let pending = "";
  let abandoned: string | undefined;
  const onText = (s: string) => {
    if (opts.echo) Deno.stderr.writeSync(new TextEncoder().encode(s));
    tail = (tail + s).slice(-8000);
    pending += s;
    let nl;
    while ((nl = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, nl).replace(/\r$/, "");
      pending = pending.slice(nl + 1);
      if (line.includes("TSVMM-")) lastOutput = performance.now();
      // L1's own kernel log lines ("[   74.98] BUG: ..."): the first failure and what follows it.
      if (l1Oops === undefined && L1_OOPS.test(line)) l1Oops = line;
      else if (l1Oops !== undefined && oopsLines < 8 && /^\[\s*\d+\.\d+\]/.test(line)) {
        l1Oops += `\n${line}`;
        oopsLines++;
      }
      const i = line.indexOf("TSVMM-RESULT ");
      if (i >= 0) {
        try {
          results.push(JSON.parse(line.slice(i + "TSVMM-RESULT ".length)));
        } catch { /* a garbled line is caught by the missing result */ }
      }
      const b = line.indexOf("TSVMM-BENCH ");
      if (b >= 0) {
        let payload: Record<string, unknown> | undefined;
        try {
          payload = JSON.parse(line.slice(b + "TSVMM-BENCH ".length));
        } catch { /* reported as missing figures */ }
        if (payload) {
          bench.push(payload);
          opts.onBench?.(payload);
        }
      }
      const net = /TSVMM-L1-PCI-NET n=(\d+)/.exec(line);
      if (net) l1NetDevices = Number(net[1]);
      if (line.includes("TSVMM-L1-DONE")) completed = true;
      const a = line.indexOf("TSVMM-L1-ABANDON ");
      if (a >= 0) {
        try {
          abandoned = String(JSON.parse(line.slice(a + "TSVMM-L1-ABANDON ".length)).reason);
        } catch {
          abandoned = line.slice(a);
        }
      }
      if (line.includes("TSVMM-L1-ALIVE")) alive = true;
    }
  };
  const errText = new Response(child.stderr).text();
  for await (const chunk of child.stdout) onText(decoder.decode(chunk, { stream: true }));
  await child.status;
  clearTimeout(timer);
  clearInterval(silence);
  // QEMU warns once per L1 vCPU about each EPYC feature TCG lacks: those lines are the same
  // every run and would push L1's own last console lines out of the tail a report shows.
  const stderr = (await errText).split("\n").filter((l) => !TCG_FEATURE_WARNING.test(l)).join("\n");
  if (stderr.trim()) tail += `\n[qemu stderr] ${stderr.trim()}`;
  await Deno.remove(dir, { recursive: true });
  if (frozen) {
    tail += `\n[runner] L1's program printed nothing for ${
      Math.round(opts.silenceMs! / 1000)
    } s and L1 was killed`;
  }
  return {
    results,
    bench,
    completed,
    l1NetDevices,
    tail,
    l1Oops,
    ms: Math.round(performance.now() - t0),
    frozen,
    timedOut,
    abandoned,
  };
}

/**
 * Splits the cases into `n` lists of about equal cost (BootCase.cost; tiny-guest cases cost
 * little), longest first onto the least loaded, each list in the suite's order.
 */
export function shareOut(cases: Array<{ name: string; cost?: number }>, n: number): string[][] {
  const load = new Array<number>(n).fill(0);
  const owner = new Map<string, number>();
  const byCost = cases.map((c, i) => ({ c, i })).sort((a, b) =>
    (b.c.cost ?? 1) - (a.c.cost ?? 1) || a.i - b.i
  );
  for (const { c } of byCost) {
    const k = load.indexOf(Math.min(...load));
    owner.set(c.name, k);
    load[k] += c.cost ?? 1;
  }
  return load.map((_, k) => cases.filter((c) => owner.get(c.name) === k).map((c) => c.name));
}

if (import.meta.main) {
  // TSVMM_L1_QEMU=1 puts QEMU into L1 too, TSVMM_L1_TOOLS=1 the tools disk and iperf3 (for experiments);
  // TSVMM_L1_TINY=1 runs the tiny-guest cases there as well.
  const r = await runNested({
    filter: Deno.args[0],
    tiny: Deno.env.get("TSVMM_L1_TINY") === "1",
    echo: true,
    withQemu: Deno.env.get("TSVMM_L1_QEMU") === "1",
    withTools: Deno.env.get("TSVMM_L1_TOOLS") === "1",
  });
  console.log(JSON.stringify({ ...r, tail: undefined }, null, 2));
}
