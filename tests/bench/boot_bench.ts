/**
 * Boot-time benchmark: spawn/create to the guest's /init marker, our VMM (through the
 * API and through the CLI) and QEMU (`-M microvm,acpi=on`), same kernel, initramfs,
 * RAM and vCPUs, alternating runs; medians. Runs wherever KVM runs stock kernels
 * (natively, or inside the nested runner's L1).
 */

import { createVm, waitForConsole } from "../../mod.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";

/** One benchmark's figures. */
export interface BenchFigure {
  /** What was measured. */
  name: string;
  /** Each run, in ms. */
  runs: number[];
  /** Median, in ms. */
  median: number;
}

const MARKER = "TSVMM-INIT-MARKER";
const CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet";
const MEMORY_MIB = 256;

/** QEMU's command line for the peer: microvm with ACPI, KVM, serial on stdio, direct kernel boot. */
export function qemuMicrovmArgs(
  kernel: string,
  initrd: string,
  cmdline: string,
  memMiB: number,
  cpus = 1,
): string[] {
  return [
    ...["-accel", "kvm", "-M", "microvm,acpi=on", "-cpu", "host", "-m", String(memMiB), "-smp", String(cpus)],
    ...["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"],
    ...["-kernel", kernel, "-initrd", initrd, "-append", cmdline],
  ];
}

/** The median of a list. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Spawns a command and resolves with ms until `marker` appears on stdout, then waits for its exit. */
async function spawnToMarker(cmd: string, args: string[], timeoutMs = 180_000): Promise<number> {
  const t0 = performance.now();
  const child = new Deno.Command(cmd, { args, stdin: "null", stdout: "piped", stderr: "piped" }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
  const stderr = new Response(child.stderr).text();
  let text = "";
  let at = -1;
  const dec = new TextDecoder();
  for await (const chunk of child.stdout) {
    text = (text + dec.decode(chunk, { stream: true })).slice(-4096);
    if (at < 0 && text.includes(MARKER)) at = performance.now() - t0;
  }
  const st = await child.status;
  clearTimeout(timer);
  if (at < 0) throw new Error(`${cmd}: no ${MARKER} (exit ${st.code}): ${text.slice(-500)} ${await stderr}`);
  return at;
}

/** Runs `runs` boots of each VMM, alternating, and returns the figures. */
export async function bootBench(g: GuestAssets, runs: number, cpus = 1): Promise<BenchFigure[]> {
  const k = g.kernels["6.1"];
  const api: number[] = [];
  const cli: number[] = [];
  const qemu: number[] = [];
  const cliPath = new URL("../../vmm/cli.ts", import.meta.url).pathname;
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const vm = await createVm({
      kernel: k.vmlinux,
      initrd: k.initramfs,
      cmdline: CMDLINE,
      memoryMiB: MEMORY_MIB,
      cpus,
    });
    await vm.start();
    await waitForConsole(vm, new RegExp(MARKER), 180_000);
    api.push(performance.now() - t0);
    await vm.wait();
    cli.push(
      await spawnToMarker(Deno.execPath(), [
        "run",
        "-A",
        "--no-check",
        cliPath,
        `--kernel=${k.vmlinux}`,
        `--initrd=${k.initramfs}`,
        `--cmdline=${CMDLINE}`,
        `--memory=${MEMORY_MIB}`,
        `--cpus=${cpus}`,
      ]),
    );
    qemu.push(
      await spawnToMarker(
        "qemu-system-x86_64",
        qemuMicrovmArgs(k.vmlinux, k.initramfs, CMDLINE, MEMORY_MIB, cpus),
      ),
    );
  }
  const fig = (name: string, r: number[]) => ({
    name,
    runs: r.map(Math.round),
    median: Math.round(median(r)),
  });
  return [
    fig(`tsvmm API: createVm -> /init marker (${cpus} vCPU)`, api),
    fig(`tsvmm CLI: process start -> /init marker (${cpus} vCPU)`, cli),
    fig(`QEMU microvm: process start -> /init marker (${cpus} vCPU)`, qemu),
  ];
}
