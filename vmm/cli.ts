/**
 * `deno task run`: boots a kernel with the serial console on this terminal.
 * Exit code: the guest's (0 after power-off or reset), 1 when the guest fails,
 * 2 for bad input (one line on stderr, no stack trace).
 */

import { parseArgs } from "node:util";
import { buildMachine } from "./builder.ts";
import {
  ConfigError,
  DEFAULT_CMDLINE,
  type DiskConfig,
  type NetConfig,
  type TransportKind,
  type VmConfig,
} from "./config.ts";
import type { Machine } from "./machine.ts";
import { CPUID_FEATURES } from "./arch/x86_64/cpuid.ts";
import { defaultGuest } from "./default_guest.ts";

const HELP = `Usage: deno task run [options]

Boots a Linux kernel in a KVM virtual machine, its serial console on this terminal.
With no --kernel, boots the project's default guest (built on first use).

Options:
  --kernel PATH         bzImage or ELF vmlinux to boot
  --initrd PATH         initramfs to load
  --cmdline TEXT        kernel command line (default: "${DEFAULT_CMDLINE}")
  --cpus N              number of vCPUs (default 1)
  --memory SIZE         guest RAM, in MiB or with a suffix: 512, 512M, 2G (default 512M)
  --cpuid-mask=LIST     CPUID bits to clear or set: --cpuid-mask=-cx16,-xsave,+0x1:ecx:31
                        (names: ${Object.keys(CPUID_FEATURES).join(" ")})
  --unpack-kernel       boot a bzImage's unpacked vmlinux (skips the decompressor)
  --pin-vcpus           give the vCPUs host CPUs of their own (the VMM's other threads on the first)
  --no-device-thread    serve the virtio queues from the main thread (slower; for comparison)
  --no-mmio-register-pages
                        every virtio-MMIO register read exits to the VMM (by default the guest
                        reads the registers from a read-only page; for comparison)
  --boot-protocol P     ELF entry: auto (PVH when the kernel has the note), linux64, pvh
  --disk SPEC           a virtio-blk disk (repeatable): PATH[,readonly][,serial=ID]
                        [,transport=pci|pci-legacy|pci-transitional|mmio|mmio-legacy]
  --rng                 a virtio-rng device fed by the host's CSPRNG
  --rng-rate BYTES      rate-limit the rng to BYTES per second
  --rng-transport T     pci (default), pci-legacy, pci-transitional, mmio or mmio-legacy
  --net SPEC            a virtio-net interface on a TAP (repeatable): tap=NAME|fd=N[,mac=52:54:..]
                        [,mtu=N][,transport=pci|pci-legacy|pci-transitional|mmio|mmio-legacy]
                        (a missing TAP is created for the VM's life, which needs CAP_NET_ADMIN)
  --kvm PATH            KVM device (default /dev/kvm)
  -h, --help            this text

On an interactive terminal, Ctrl-A x quits and Ctrl-A Ctrl-A sends Ctrl-A.
`;

function parseMemory(s: string): number {
  const m = /^(\d+)\s*([mMgG]i?[bB]?)?$/.exec(s.trim());
  if (!m) throw new ConfigError(`--memory "${s}" is not a size such as 512, 512M or 2G`);
  const n = Number(m[1]);
  return m[2] && /^g/i.test(m[2]) ? n * 1024 : n;
}

function parseCount(s: string, flag: string): number {
  if (!/^\d+$/.test(s)) throw new ConfigError(`${flag} "${s}" is not a whole number`);
  return Number(s);
}

/** Parses command-line arguments into a VM config (undefined for --help). */
export function parseCli(args: string[]): VmConfig | undefined {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        kernel: { type: "string" },
        initrd: { type: "string" },
        cmdline: { type: "string" },
        cpus: { type: "string" },
        memory: { type: "string" },
        "cpuid-mask": { type: "string" },
        "unpack-kernel": { type: "boolean" },
        "pin-vcpus": { type: "boolean" },
        "no-device-thread": { type: "boolean" },
        "no-mmio-register-pages": { type: "boolean" },
        "boot-protocol": { type: "string" },
        kvm: { type: "string" },
        disk: { type: "string", multiple: true },
        net: { type: "string", multiple: true },
        rng: { type: "boolean" },
        "rng-rate": { type: "string" },
        "rng-transport": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
      allowPositionals: false,
    });
  } catch (e) {
    throw new ConfigError(`${(e as Error).message.split("\n")[0]} (see --help)`);
  }
  const v = parsed.values;
  if (v.help) return undefined;
  return {
    kernel: v.kernel,
    initrd: v.initrd,
    cmdline: v.cmdline,
    cpus: v.cpus === undefined ? undefined : parseCount(v.cpus, "--cpus"),
    memoryMiB: v.memory === undefined ? undefined : parseMemory(v.memory),
    cpuidMask: v["cpuid-mask"],
    unpackKernel: v["unpack-kernel"],
    pinVcpus: v["pin-vcpus"],
    deviceThread: v["no-device-thread"] ? false : undefined,
    mmioRegisterPages: v["no-mmio-register-pages"] ? false : undefined,
    bootProtocol: v["boot-protocol"] as VmConfig["bootProtocol"],
    kvmDevice: v.kvm,
    disks: (v.disk ?? []).map(parseDisk),
    nets: (v.net ?? []).map(parseNet),
    rng: v.rng || v["rng-rate"] || v["rng-transport"]
      ? {
        rateBytesPerSec: v["rng-rate"] === undefined ? undefined : parseCount(v["rng-rate"], "--rng-rate"),
        transport: v["rng-transport"] as TransportKind | undefined,
      }
      : undefined,
    stdio: true,
  };
}

/** Parses `PATH[,readonly][,serial=ID][,transport=KIND]`. */
export function parseDisk(spec: string): DiskConfig {
  const [path, ...opts] = spec.split(",");
  const d: DiskConfig = { path };
  for (const o of opts) {
    const [k, val] = o.includes("=")
      ? [o.slice(0, o.indexOf("=")), o.slice(o.indexOf("=") + 1)]
      : [o, undefined];
    if ((k === "readonly" || k === "ro") && val === undefined) d.readonly = true;
    else if (k === "serial" && val !== undefined) d.serial = val;
    else if (k === "transport" && val !== undefined) d.transport = val as TransportKind;
    else {throw new ConfigError(
        `--disk ${path}: unknown option "${o}" (readonly, serial=ID, transport=pci|pci-legacy|pci-transitional|mmio|mmio-legacy)`,
      );}
  }
  return d;
}

/** Parses `tap=NAME|fd=N[,mac=MAC][,mtu=N][,transport=KIND]`. */
export function parseNet(spec: string): NetConfig {
  const n: NetConfig = {};
  for (const o of spec.split(",")) {
    const i = o.indexOf("=");
    const [k, val] = i < 0 ? [o, ""] : [o.slice(0, i), o.slice(i + 1)];
    if (k === "tap" && i > 0) n.tap = val;
    else if (k === "fd" && i > 0) n.fd = parseCount(val, "--net fd");
    else if (k === "mac" && i > 0) n.mac = val;
    else if (k === "mtu" && i > 0) n.mtu = parseCount(val, "--net mtu");
    else if (k === "transport" && i > 0) n.transport = val as TransportKind;
    else {
      throw new ConfigError(
        `--net ${spec}: unknown option "${o}" (tap=NAME or fd=N, mac=52:54:00:12:34:56, mtu=N, transport=pci|pci-legacy|pci-transitional|mmio|mmio-legacy)`,
      );
    }
  }
  return n;
}

const CTRL_A = 0x01;

/** Copies stdin into the guest console; Ctrl-A x ends the VM when interactive. */
async function pumpStdin(vm: Machine, interactive: boolean): Promise<void> {
  let escape = false;
  const buf = new Uint8Array(4096);
  for (;;) {
    let n: number | null;
    try {
      n = await Deno.stdin.read(buf);
    } catch {
      return;
    }
    if (n === null) return;
    const out: number[] = [];
    for (const b of buf.subarray(0, n)) {
      if (interactive && escape) {
        escape = false;
        if (b === 0x78 || b === 0x58) { // x
          await vm.stop();
          return;
        }
        if (b === CTRL_A) out.push(CTRL_A);
        continue;
      }
      if (interactive && b === CTRL_A) {
        escape = true;
        continue;
      }
      out.push(b);
    }
    const bytes = new Uint8Array(out);
    while (!vm.console.input(bytes)) await new Promise((r) => setTimeout(r, 10));
  }
}

/** Runs the CLI; returns the process exit code. */
export async function main(args: string[]): Promise<number> {
  let vm: Machine;
  try {
    const config = parseCli(args);
    if (!config) {
      console.log(HELP);
      return 0;
    }
    if (!config.kernel) Object.assign(config, await defaultGuest(config));
    vm = await buildMachine(config);
  } catch (e) {
    if (e instanceof ConfigError) {
      console.error(`error: ${e.message}`);
      return 2;
    }
    console.error(`error: ${(e as Error).message}`);
    return 1;
  }
  const interactive = Deno.stdin.isTerminal();
  if (interactive) Deno.stdin.setRaw(true);
  const onSignal = () => void vm.stop();
  Deno.addSignalListener("SIGTERM", onSignal);
  if (!interactive) Deno.addSignalListener("SIGINT", onSignal);
  try {
    await vm.start();
  } catch (e) {
    if (interactive) Deno.stdin.setRaw(false);
    console.error(`error: ${(e as Error).message}`);
    return 1;
  }
  pumpStdin(vm, interactive);
  const exit = await vm.exited;
  if (interactive) Deno.stdin.setRaw(false);
  if (exit.code !== 0) console.error(`\ntsvmm: ${exit.message}`);
  return exit.code;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
