/**
 * virtio-blk and virtio-rng throughput with dd in the guest, tsvmm beside QEMU's
 * virtio-mmio devices (microvm), same kernel, initramfs and image size.
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

async function ours(g: GuestAssets) {
  const img = await image();
  try {
    const k = g.kernels["6.1"];
    return await bootTest(
      {
        kernel: k.vmlinux,
        initrd: k.initramfs,
        memoryMiB: 256,
        disks: [{ path: img }],
        rng: true,
        cmdline: CMDLINE,
      },
      async (vm) => {
        await waitForConsole(vm, /TSVMM-CHECK ddbench .*/, 600_000);
        await vm.wait();
        return parse(vm.consoleText);
      },
      660_000,
    );
  } finally {
    await Deno.remove(img);
  }
}

async function qemu(g: GuestAssets) {
  const img = await image();
  try {
    const k = g.kernels["6.1"];
    const out = await new Deno.Command("qemu-system-x86_64", {
      args: [
        ...qemuMicrovmArgs(k.vmlinux, k.initramfs, CMDLINE, 256),
        "-drive",
        `id=d0,file=${img},format=raw,if=none`,
        "-device",
        "virtio-blk-device,drive=d0",
        "-object",
        "rng-random,id=r0,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=r0",
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    return parse(new TextDecoder().decode(out.stdout));
  } finally {
    await Deno.remove(img);
  }
}

/** Device throughput, `runs` alternating runs each. */
export async function deviceBench(g: GuestAssets, runs: number): Promise<BenchFigure[]> {
  const r: Record<string, number[]> = {};
  const push = (k: string, v: number) => (r[k] ??= []).push(v);
  for (let i = 0; i < runs; i++) {
    const a = await ours(g);
    const b = await qemu(g);
    push("tsvmm blk sequential read MB/s", a.read);
    push("QEMU blk sequential read MB/s", b.read);
    push("tsvmm blk sequential write MB/s (fsync)", a.write);
    push("QEMU blk sequential write MB/s (fsync)", b.write);
    push("tsvmm rng MB/s (/dev/hwrng)", a.rng);
    push("QEMU rng MB/s (/dev/hwrng)", b.rng);
  }
  return Object.entries(r).map(([name, v]) => ({
    name,
    runs: v.map((x) => Math.round(x * 100) / 100),
    median: median(v),
  }));
}
