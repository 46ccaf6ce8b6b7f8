/**
 * virtio-net: TCP throughput with iperf3 (guest to host and host to guest) and the ping round
 * trip, tsvmm beside QEMU's virtio-net on the same transport over a TAP without vhost
 * (`-netdev tap,...,vhost=off`; microvm with pcie=on and virtio-net-pci for PCI, disable-legacy
 * or disable-modern as the device bench does, virtio-net-device for MMIO), both pinned the same
 * way. The guest runs iperf3 and ping; the host end is an iperf3 server on the TAP's address.
 *
 * Network rules as in the boot cases (tests/boot/net_peer.ts): the TAPs live only in a
 * namespace with no other device (the nested runner's L1, or `unshare --net` around this file
 * run as a program), with 169.254.0.0/16 addresses.
 */

import { bootTest, waitForConsole } from "../../mod.ts";
import type { GuestAssets } from "../../vmm/guest/build.ts";
import type { TransportKind } from "../../vmm/config.ts";
import { createPersistentTap, removePersistentTap } from "../../vmm/tap.ts";
import { type BenchFigure, type BenchSink, FigureSet, qemuMicrovmArgs, vmTimeoutMs } from "./boot_bench.ts";
import { BENCH_TRANSPORTS } from "./device_bench.ts";
import { deviceReport, qemuVirtioDevice, reportSpans, runPinnedQemu } from "./bench_vms.ts";
import { addressTap, guestAddr, hostAddr, inIsolatedNetns } from "../boot/net_peer.ts";

const IPERF_SECONDS = 5;
/**
 * Pings per run, after iperf3: more than the 256 spans the device report keeps, so its
 * request split (ours) covers pings only.
 */
const PINGS = 300;
/** Test networks 169.254.41.0/24 and up, one per transport. */
const NET_BASE = 41;

/** The figures one VM run gives, by name suffix and unit. */
const NET_FIGURES: Array<[string, string]> = [
  ["net TCP guest->host Mbit/s (iperf3)", "Mbit/s"],
  ["net TCP host->guest Mbit/s (iperf3)", "Mbit/s"],
  ["net ping round trip ms (guest->host)", "ms"],
  ["net ping round trip ms, median (guest->host)", "ms"],
];

/**
 * Ours only: where a ping's time goes as the device thread sees it (the net device's request
 * split in the device report, over the last 256 pings): from the transmit doorbell to the
 * first interrupt after it (the frame written to the TAP and the reply read back), and from
 * the last interrupt to the next doorbell (the rest: the interrupts' way into the guest, its
 * network stack and ping, the notify exit and this thread's wake-up).
 */
const PING_SPLIT: Array<[string, string]> = [
  ["doorbell_to_irq_us", "net ping: doorbell -> interrupt (device side), us"],
  ["irq_to_doorbell_us", "net ping: interrupt -> next doorbell (the rest), us"],
];

/** The figures netBench takes. */
export function netFigureNames(): string[] {
  return BENCH_TRANSPORTS.flatMap((t) => [
    ...["tsvmm", "QEMU"].flatMap((who) => NET_FIGURES.map(([f]) => `${who} ${t} ${f}`)),
    ...PING_SPLIT.map(([, f]) => `tsvmm ${t} ${f}`),
  ]);
}

/** A median from the net device's line of the device report (see PING_SPLIT). */
function pingSplit(report: string[], key: string): number {
  const s = reportSpans(report, "virtio-net", key);
  if (s.count < 256) throw new Error(`${key} covers ${s.count} spans, not the last 256 pings`);
  return s.median;
}

function cmdline(n: number, mac: string): string {
  return "console=ttyS0 reboot=k panic=-1 quiet tsvmm.checks=pci,pcilog,iperf,net " +
    `tsvmm.net=${mac}:${guestAddr(n)}/24 tsvmm.pings=${PINGS}:A tsvmm.iperf=${IPERF_SECONDS}`;
}

/**
 * Mbit/s both ways, and the pings' mean and median round trip, from the guest's lines (the
 * mean counts the few slow replies the median leaves out).
 */
function parse(text: string): number[] {
  const ip = /TSVMM-CHECK iperf if=\S+ peer=\S+ tx_mbps=([\d.]+) rx_mbps=([\d.]+)/.exec(text);
  const rtt = /TSVMM-CHECK net if=.* ping_rx=(\d+) rtt_ms=([\d.]+) .*rtt_median_ms=([\d.]+)/.exec(text);
  const lines = () => text.split("\n").filter((l) => /^TSVMM-/.test(l)).join("\n");
  if (!ip || !(Number(ip[1]) > 0) || !(Number(ip[2]) > 0)) {
    throw new Error(`iperf3 gave no figures:\n${lines()}`);
  }
  if (!rtt || Number(rtt[1]) === 0) throw new Error(`no ping answered:\n${lines()}`);
  return [Number(ip[1]), Number(ip[2]), Number(rtt[2]), Number(rtt[3])];
}

async function ours(
  g: GuestAssets,
  t: TransportKind,
  tap: string,
  n: number,
  mac: string,
): Promise<{ text: string; report: string[] }> {
  const k = g.kernels["6.1"];
  return await bootTest(
    {
      kernel: k.vmlinux,
      initrd: k.initramfs,
      memoryMiB: 512,
      nets: [{ tap, mac, transport: t }],
      disks: [{ path: g.toolsImage!, readonly: true, transport: t }],
      cmdline: cmdline(n, mac),
      pinVcpus: true,
    },
    async (vm) => {
      await waitForConsole(vm, /TSVMM-CHECKS-DONE/, vmTimeoutMs());
      await vm.wait();
      // The device report after the stop (the device thread's final counts).
      return { text: vm.consoleText, report: deviceReport(vm) };
    },
    vmTimeoutMs() + 30_000,
  );
}

async function qemu(g: GuestAssets, t: TransportKind, tap: string, n: number, mac: string): Promise<string> {
  const k = g.kernels["6.1"];
  const pci = t.startsWith("pci");
  const dev = (kind: string, props: string) => qemuVirtioDevice(kind, props, t);
  const args = qemuMicrovmArgs(k.vmlinux, k.initramfs, cmdline(n, mac), 512);
  if (pci) args[args.indexOf("microvm,acpi=on")] = "microvm,acpi=on,pcie=on";
  args.push("-netdev", `tap,id=n0,ifname=${tap},script=no,downscript=no,vhost=off`);
  // No option ROM (microvm boots the kernel directly; L1 carries no efi-virtio.rom).
  args.push("-device", dev("net", `netdev=n0,mac=${mac}${pci ? ",romfile=" : ""}`));
  args.push(
    "-drive",
    `id=d1,file=${g.toolsImage},format=raw,if=none,readonly=on`,
    "-device",
    dev("blk", "drive=d1"),
  );
  return await runPinnedQemu(args, /TSVMM-CHECKS-DONE/);
}

/**
 * Network throughput and latency, `runs` alternating runs per transport; values go to `sink`
 * as they are measured and a failed run is reported there as missing. `iperf3` is the command
 * that runs iperf3 on this side. Needs an isolated network namespace (see the file comment).
 */
export async function netBench(
  g: GuestAssets,
  runs: number,
  sink: BenchSink,
  iperf3: string[],
): Promise<BenchFigure[]> {
  if (!inIsolatedNetns()) throw new Error("the network bench runs only in an isolated network namespace");
  const set = new FigureSet(sink);
  for (let i = 0; i < runs; i++) {
    for (const [j, t] of BENCH_TRANSPORTS.entries()) {
      const n = NET_BASE + j;
      const tap = `tsvb${n}`;
      const mac = `52:54:00:00:${n.toString(16).padStart(2, "0")}:02`;
      for (const who of ["tsvmm", "QEMU"] as const) {
        let server: Deno.ChildProcess | undefined;
        try {
          createPersistentTap(tap);
          await addressTap(tap, n);
          server = new Deno.Command(iperf3[0], {
            args: [...iperf3.slice(1), "-s", "-B", hostAddr(n)],
            stdin: "null",
            stdout: "null",
            stderr: "null",
          }).spawn();
          await new Promise((r) => setTimeout(r, 1000)); // the server listens before the guest asks
          const run = who === "tsvmm"
            ? await ours(g, t, tap, n, mac)
            : { text: await qemu(g, t, tap, n, mac) };
          const v = parse(run.text);
          NET_FIGURES.forEach(([f, unit], x) => set.add(`${who} ${t} ${f}`, unit, v[x]));
          if ("report" in run) {
            for (const [key, f] of PING_SPLIT) {
              await set.measure(
                `${who} ${t} ${f}`,
                "us",
                i,
                () => Promise.resolve(pingSplit(run.report, key)),
              );
            }
          }
        } catch (e) {
          sink.missing(`${who} ${t} net iperf3 and ping, run ${i + 1}`, String((e as Error).message ?? e));
        } finally {
          try {
            server?.kill("SIGKILL");
            await server?.status;
          } catch { /* gone */ }
          removePersistentTap(tap);
        }
      }
    }
  }
  return set.figures();
}

// As a program (the bench on a host whose KVM runs stock kernels): re-run in a network
// namespace of its own, printing "TSVMM-BENCH {json}" lines as the L1 bench does.
if (import.meta.main) {
  const { buildGuest } = await import("../../vmm/guest/build.ts");
  const { buildToolsDisk } = await import("../../vmm/guest/tools_disk.ts");
  if (!inIsolatedNetns()) {
    const r = await new Deno.Command("unshare", {
      args: ["--net", "--", Deno.execPath(), "run", "-A", new URL(import.meta.url).pathname, ...Deno.args],
      env: { TSVMM_NET_ISOLATED: "1" },
    }).spawn().status;
    Deno.exit(r.code);
  }
  const g = await buildGuest({ quiet: true });
  const tools = await buildToolsDisk({ quiet: true });
  g.toolsImage = tools.image;
  const emit = (o: Record<string, unknown>) => console.log("TSVMM-BENCH " + JSON.stringify(o));
  const figures = await netBench(g, Number(Deno.args[0] ?? "1"), {
    value: (name, v, unit) => emit({ value: name, v, unit }),
    missing: (name, why) => emit({ missing: name, why: why.slice(-3000) }),
  }, [`${tools.tree}/ld.so`, "--library-path", `${tools.tree}/lib`, `${tools.tree}/iperf3`]);
  for (const f of figures) emit({ figure: f });
}
