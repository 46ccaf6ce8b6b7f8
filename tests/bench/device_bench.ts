/**
 * virtio-blk and virtio-rng throughput with dd in the guest, and 4 KiB random IOPS with fio,
 * tsvmm (vCPU pinned) beside QEMU's virtio-mmio devices (microvm, unpinned), same kernel,
 * initramfs and image size.
 */

import { bootTest, waitForConsole } from "../../mod.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";
import { type BenchFigure, median, qemuMicrovmArgs } from "./boot_bench.ts";

const MIB = 1024 * 1024;
const DISK_MIB = 64;
const RW_MIB = 32;
const CMDLINE = `console=ttyS0 reboot=k panic=-1 quiet tsvmm.checks=ddbench tsvmm.ddbench=vda:${RW_MIB}`;

/** MB/s from the guest's ddbench line (seconds measured in the guest with /proc/uptime). */
function parse(text: string): { read: number; write: number; rng: number } {
  const m = /TSVMM-CHECK ddbench mb=(\d+) read_s=([\d.]+) write_s=([\d.]+) rng_kib=(\d+) rng_s=([\d.]+)/.exec(
    text,
  );
  if (!m) throw new Error("no ddbench line on the console");
  const rate = (mib: number, s: string) => mib / Math.max(Number(s), 0.01);
  return {
    read: rate(Number(m[1]), m[2]),
    write: rate(Number(m[1]), m[3]),
    rng: rate(Number(m[4]) / 1024, m[5]),
  };
}

async function image(): Promise<string> {
  const p = await Deno.makeTempFile({ suffix: ".img" });
  await Deno.writeFile(p, new Uint8Array(DISK_MIB * MIB).fill(0x5a)); // real blocks, not holes
  return p;
}

/** Extra disks and devices of one bench boot. */
interface BenchVm {
  cmdline: string;
  memoryMiB: number;
  /** The line the guest prints when done. */
  marker: RegExp;
  rng?: boolean;
  /** A read-only second disk. */
  tools?: string;
}

/** Boots tsvmm with a fresh data disk (plus `b`'s devices); returns the console text. */
async function ours(g: GuestAssets, b: BenchVm): Promise<string> {
  const img = await image();
  try {
    const k = g.kernels["6.1"];
    const disks = [{ path: img }, ...(b.tools ? [{ path: b.tools, readonly: true }] : [])];
    return await bootTest(
      {
        kernel: k.vmlinux,
        initrd: k.initramfs,
        memoryMiB: b.memoryMiB,
        disks,
        rng: b.rng,
        cmdline: b.cmdline,
        // A vCPU sharing its CPU with the VMM's threads is what makes long interrupt-heavy
        // runs fail under the nested runner (README, Known problems).
        pinVcpus: true,
      },
      async (vm) => {
        await waitForConsole(vm, b.marker, 600_000);
        await vm.wait();
        return vm.consoleText;
      },
      660_000,
    );
  } finally {
    await Deno.remove(img);
  }
}

/** The same boot under QEMU microvm with its virtio-mmio devices; returns the console text. */
async function qemu(g: GuestAssets, b: BenchVm): Promise<string> {
  const img = await image();
  try {
    const k = g.kernels["6.1"];
    const args = [
      ...qemuMicrovmArgs(k.vmlinux, k.initramfs, b.cmdline, b.memoryMiB),
      ...["-drive", `id=d0,file=${img},format=raw,if=none`, "-device", "virtio-blk-device,drive=d0"],
    ];
    if (b.tools) {
      args.push("-drive", `id=d1,file=${b.tools},format=raw,if=none,readonly=on`);
      args.push("-device", "virtio-blk-device,drive=d1");
    }
    if (b.rng) {
      args.push("-object", "rng-random,id=r0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r0");
    }
    const out = await new Deno.Command("qemu-system-x86_64", {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    return new TextDecoder().decode(out.stdout);
  } finally {
    await Deno.remove(img);
  }
}

const DD: BenchVm = { cmdline: CMDLINE, memoryMiB: 256, marker: /TSVMM-CHECK ddbench .*/, rng: true };

const FIO_SECONDS = 5;
const FIO_JOBS = ["randread_qd1", "randread_qd32", "randwrite_qd1", "randwrite_qd32"] as const;

/** fio's boot: the tools disk is found by the guest, whatever order the VMM gives the disks. */
function fioVm(tools: string): BenchVm {
  return {
    cmdline: `console=ttyS0 reboot=k panic=-1 quiet tsvmm.checks=fio tsvmm.fio=${FIO_SECONDS}`,
    memoryMiB: 512,
    marker: /TSVMM-CHECK fio .*/,
    tools,
  };
}

/** IOPS per fio job from the guest's fio line. */
function parseFio(text: string): Record<string, number> {
  const m = /TSVMM-CHECK fio (.*)/.exec(text);
  if (!m || m[1].includes("error=")) {
    throw new Error(`fio did not run in the guest: ${m?.[0] ?? "no fio line"}`);
  }
  const r: Record<string, number> = {};
  for (const j of FIO_JOBS) {
    const v = Number(new RegExp(`${j}=([\\d.]+)`).exec(m[1])?.[1]);
    if (!(v > 0)) throw new Error(`fio reported no IOPS for ${j}: ${m[0]}`);
    r[j] = v;
  }
  return r;
}

/** Device throughput, `runs` alternating runs each; `errors` says what could not be measured. */
export async function deviceBench(
  g: GuestAssets,
  runs: number,
): Promise<{ figures: BenchFigure[]; errors: string[] }> {
  const errors: string[] = [];
  const r: Record<string, number[]> = {};
  const push = (k: string, v: number) => (r[k] ??= []).push(v);
  for (let i = 0; i < runs; i++) {
    const a = parse(await ours(g, DD));
    const b = parse(await qemu(g, DD));
    push("tsvmm blk sequential read MB/s", a.read);
    push("QEMU blk sequential read MB/s", b.read);
    push("tsvmm blk sequential write MB/s (fsync)", a.write);
    push("QEMU blk sequential write MB/s (fsync)", b.write);
    push("tsvmm rng MB/s (/dev/hwrng)", a.rng);
    push("QEMU rng MB/s (/dev/hwrng)", b.rng);
    if (g.fioImage && errors.length === 0) {
      // A failed fio boot is reported and ends the fio part; the other figures stand.
      try {
        const fa = parseFio(await ours(g, fioVm(g.fioImage)));
        const fb = parseFio(await qemu(g, fioVm(g.fioImage)));
        for (const j of FIO_JOBS) {
          push(`tsvmm blk 4 KiB ${j.replace("_qd", " QD")} IOPS`, fa[j]);
          push(`QEMU blk 4 KiB ${j.replace("_qd", " QD")} IOPS`, fb[j]);
        }
      } catch (e) {
        errors.push(`fio random IOPS: ${(e as Error).message}`);
      }
    }
  }
  if (!g.fioImage) errors.push("no fio tools disk: the random IOPS figures are missing");
  const figures = Object.entries(r).map(([name, v]) => ({
    name,
    runs: v.map((x) => Math.round(x * 100) / 100),
    median: median(v),
  }));
  return { figures, errors };
}
