/**
 * One linear recipe: config -> KVM -> memory -> irqchip -> devices -> kernel -> vCPUs.
 * Every user-fixable problem becomes a one-line ConfigError before anything runs.
 */

import { ConfigError, resolveConfig, type TransportKind, type VmConfig } from "./config.ts";
import { encodeCpuid, Kvm } from "./kvm.ts";
import { VmFd } from "./vm.ts";
import { GuestMemory } from "./memory.ts";
import { Bus } from "./bus.ts";
import { ConsoleHub } from "./console.ts";
import { Machine } from "./machine.ts";
import { mmapAnonymous, reserveInPlace, sysMunmap } from "./sys/libc.ts";
import { CAP } from "./sys/kvm_abi.ts";
import { type KernelImage, NotAKernelError, parseKernel } from "./boot/kernel_image.ts";
import { unpackBzImage } from "./boot/unpack.ts";
import { loadKernel, planKernelLoad } from "./boot/loader.ts";
import { buildAcpiTables } from "./arch/x86_64/acpi.ts";
import { normalizeCpuid } from "./arch/x86_64/cpuid.ts";
import { describeIoapic } from "./arch/x86_64/diag.ts";
import { BOOT_MSRS, type EntryState, writeBootTables } from "./arch/x86_64/regs.ts";
import * as L from "./arch/x86_64/layout.ts";
import { Serial } from "../devices/legacy/serial.ts";
import { I8042, I8042_CMD, I8042_DATA } from "../devices/legacy/i8042.ts";
import { AcpiPm } from "../devices/legacy/acpi_pm.ts";
import type { VcpuStart } from "./vcpus.ts";
import { EventLoop } from "./event_loop.ts";
import { VirtioMmioDevices } from "./virtio_mmio_bus.ts";
import { PciDevices } from "./pci_devices.ts";
import { type DeviceSpec, DeviceThread, type SharedMemoryLayout } from "./device_thread.ts";
import { GsiRouting } from "./irq_routing.ts";
import { SharedRegisters } from "./shared_regs.ts";
import { DiskError, FileBackend } from "./block_file.ts";
import { VirtioBlk } from "../devices/virtio/blk.ts";
import { VirtioRng } from "../devices/virtio/rng.ts";
import { VirtioNet } from "../devices/virtio/net.ts";
import { macForName, Tap, TapError } from "./tap.ts";
import { readUserFile, type UserFile } from "./user_file.ts";

/** Builds a VM from a config; call `start()` on the result to run it. */
export async function buildMachine(config: VmConfig): Promise<Machine> {
  // The kernel and initrd as read: given back once the guest has its copy, or on failure.
  const files: UserFile[] = [];
  try {
    return await build(config, files);
  } finally {
    for (const f of files) f.release();
  }
}

async function build(config: VmConfig, files: UserFile[]): Promise<Machine> {
  const read = async (path: string, what: string) => {
    const f = await readUserFile(path, what);
    files.push(f);
    return f.bytes;
  };
  const cfg = resolveConfig(config);
  let kernel: KernelImage | undefined;
  if (!cfg.program) {
    const kernelFile = await read(cfg.kernel, "kernel");
    try {
      kernel = parseKernel(kernelFile, cfg.kernel);
      if (kernel.kind === "bzimage" && cfg.unpackKernel) {
        kernel = parseKernel(await unpackBzImage(kernel, cfg.kernel), cfg.kernel);
      }
    } catch (e) {
      if (e instanceof NotAKernelError) throw new ConfigError(e.message);
      throw e;
    }
  }
  const initrd = cfg.initrd ? await read(cfg.initrd, "initrd") : undefined;
  // Command line, memory and initrd against the kernel's needs, before KVM is opened: a bad
  // config gets its own error whether or not this host has KVM.
  if (kernel) {
    planKernelLoad({
      kernel,
      initrd,
      cmdline: cfg.cmdline,
      memSize: cfg.memoryBytes,
      protocol: cfg.bootProtocol,
    });
  }

  // Disks open (and lock) before anything else, so a missing or locked image is a clear error.
  const backends: FileBackend[] = [];
  const taps: Tap[] = [];
  // TAPs close after the disks' last calls settle; a TAP this VM created goes away with its fd.
  const closeBackends = (retire = false) =>
    Promise.all(backends.map((b) => b.close(retire))).finally(() => taps.forEach((t) => t.close()));
  try {
    for (const d of cfg.disks) backends.push(FileBackend.open(d.path, d.readonly));
    // TAPs too: a missing permission or a busy TAP is a one-line error before KVM is opened.
    for (const n of cfg.nets) taps.push(Tap.open({ name: n.tap, fd: n.fd }));
  } catch (e) {
    await closeBackends();
    if (e instanceof DiskError || e instanceof TapError) throw new ConfigError(e.message);
    throw e;
  }

  let kvm: Kvm;
  try {
    kvm = Kvm.open(cfg.kvmDevice);
  } catch (e) {
    await closeBackends();
    throw new ConfigError((e as Error).message);
  }
  const maxVcpus = kvm.maxVcpus();
  if (cfg.cpus > maxVcpus) {
    kvm.close();
    await closeBackends();
    throw new ConfigError(`--cpus ${cfg.cpus} is more than this KVM allows (${maxVcpus})`);
  }

  const vm = new VmFd(kvm.createVm());
  const ptr = mmapAnonymous(cfg.memoryBytes);
  const released = { done: false };
  let loop: EventLoop | undefined;
  let thread: DeviceThread | undefined;
  let virtio: VirtioMmioDevices | undefined;
  let pci: PciDevices | undefined;
  const release = async () => {
    if (released.done) return;
    released.done = true;
    // Order matters: stop new work, drain in-flight I/O, and only then close the images
    // (a queued call must never run on a reused fd number) and unmap guest RAM.
    if (loop) await loop.stop();
    await virtio?.close();
    await pci?.close();
    await thread?.stop();
    // A device thread that died may have left transfers running (its io_uring, Deno's
    // blocking pool) that write guest RAM and use the images' fd numbers: those numbers are
    // kept (naming /dev/null) and RAM's addresses stay reserved, without memory, until the
    // process exits, so nothing opened or mapped later can receive such a transfer.
    const abandoned = thread?.died === true;
    await closeBackends(abandoned);
    vm.close();
    kvm.close();
    if (!abandoned) sysMunmap(ptr, cfg.memoryBytes);
    else if (reserveInPlace(ptr, cfg.memoryBytes)) {
      console.error(
        `device thread died: guest RAM's ${cfg.memoryBytes / 2 ** 20} MiB of addresses (no memory) and ` +
          `the disks' fd numbers stay reserved until this process exits`,
      );
    } else console.error("device thread died: guest RAM stays mapped until this process exits");
  };
  try {
    vm.setTssAddr(L.KVM_TSS_ADDR);
    try {
      vm.setIdentityMapAddr(L.KVM_IDENTITY_MAP_ADDR);
    } catch {
      // Only Intel's real-mode emulation uses it; AMD and PVM may refuse.
    }
    vm.createIrqchip();
    vm.createPit2();

    const host = Deno.UnsafePointerView.getArrayBuffer(ptr, cfg.memoryBytes);
    const base = BigInt(Deno.UnsafePointer.value(ptr));
    let off = 0;
    const layout: SharedMemoryLayout = { base, size: cfg.memoryBytes, regions: [] };
    const regions = L.ramRanges(cfg.memoryBytes).map(([gpa, size], slot) => {
      vm.setUserMemoryRegion(slot, gpa, size, base + BigInt(off));
      const r = { gpa, bytes: new Uint8Array(host, off, size) };
      layout.regions.push({ gpa, offset: off, size });
      off += size;
      return r;
    });
    const memory = new GuestMemory(regions);

    const pio = new Bus("pio");
    const mmio = new Bus("mmio");
    loop = new EventLoop();
    const shared = new SharedRegisters(vm.fd);
    // The register pages' memory slots come after RAM's.
    const pageSlot = cfg.mmioRegisterPages && vm.checkExtension(CAP.READONLY_MEM) > 0
      ? regions.length
      : undefined;
    virtio = new VirtioMmioDevices(vm, mmio, memory, loop, shared, pageSlot);
    const mmio64Start = L.pciMmio64Start(cfg.memoryBytes);
    pci = new PciDevices(vm, pio, mmio, memory, loop, new GsiRouting(vm), [
      mmio64Start,
      mmio64Start + L.PCI_MMIO64_SIZE,
    ], shared);
    // With a device thread, each device here answers config space only; the thread runs a
    // twin built from `spec` over the same image, TAP or entropy source.
    if (cfg.deviceThread) thread = new DeviceThread(layout);
    const place = (dev: VirtioBlk | VirtioRng | VirtioNet, spec: DeviceSpec, transport: TransportKind) => {
      const d = thread ? thread.remote(dev, spec) : dev;
      if (transport === "mmio" || transport === "mmio-legacy") virtio!.add(d, transport);
      else pci!.add(d, transport);
    };
    cfg.disks.forEach((d, i) => {
      const spec: DeviceSpec = { kind: "blk", disk: backends[i].share(), serial: d.serial };
      place(new VirtioBlk(backends[i], { serial: d.serial }), spec, d.transport);
    });
    if (cfg.rng) {
      const rng = new VirtioRng({ fill: (b) => crypto.getRandomValues(b) }, cfg.rng);
      const opts = { maxRequestBytes: cfg.rng.maxRequestBytes, rateBytesPerSec: cfg.rng.rateBytesPerSec };
      place(rng, { kind: "rng", opts }, cfg.rng.transport);
    }
    cfg.nets.forEach((n, i) => {
      const tap = taps[i];
      const mac = n.mac ?? macForName(tap.name);
      if (!thread) tap.attach(loop!);
      place(
        new VirtioNet(tap, { mac, mtu: n.mtu }),
        { kind: "net", tapFd: tap.fd, mac, mtu: n.mtu },
        n.transport,
      );
    });
    const mmioDevices = virtio.placed.map((p) => p.info);
    const acpi = { cpus: cfg.cpus, mmioDevices, pci: pci.hostInfo() };
    for (const [addr, bytes] of buildAcpiTables(acpi, L.ACPI_START, L.RSDP_ADDR)) {
      memory.write(addr, bytes);
    }
    let entry: EntryState;
    if (kernel) {
      entry = loadKernel(memory, {
        kernel,
        initrd,
        cmdline: cfg.cmdline,
        memSize: cfg.memoryBytes,
        rsdpAddr: L.RSDP_ADDR,
        protocol: cfg.bootProtocol,
      });
    } else {
      const prog = cfg.program!;
      memory.write(prog.at, prog.code);
      writeBootTables(memory, "long64");
      entry = { mode: "long64", rip: prog.at, rsi: 0 };
    }

    const hub = new ConsoleHub(cfg.stdio);
    // deno-lint-ignore prefer-const
    let machine: Machine;
    const serial = new Serial({
      output: (b) => hub.outputByte(b),
      setIrq: (level) => vm.irqLine(L.COM1_IRQ, level),
    });
    hub.attachInput((b) => serial.enqueueInput(b));
    pio.register(L.COM1_PORT, 8, {
      read: (o, d) => {
        serial.read(o, d);
        if (o === 0) hub.drainInput();
      },
      write: (o, d) => serial.write(o, d),
    }, "COM1");
    const resetVm = () => void machine.end({ code: 0, reason: "reset", message: "guest reset" });
    const i8042 = new I8042({
      reset: resetVm,
      interrupt: () => {
        vm.irqLine(L.I8042_IRQ, true);
        vm.irqLine(L.I8042_IRQ, false);
      },
    });
    pio.register(L.I8042_DATA_PORT, 1, {
      read: (_, d) => i8042.read(I8042_DATA, d),
      write: (_, d) => i8042.write(I8042_DATA, d),
    }, "i8042 data");
    pio.register(L.I8042_CMD_PORT, 1, {
      read: (_, d) => i8042.read(I8042_CMD, d),
      write: (_, d) => i8042.write(I8042_CMD, d),
    }, "i8042 command");
    const pm = new AcpiPm({
      powerOff: () => void machine.end({ code: 0, reason: "poweroff", message: "guest powered off" }),
      reset: resetVm,
    }, L.ACPI_RESET_VALUE);
    pio.register(L.ACPI_SLEEP_CONTROL_PORT, 3, pm, "ACPI power");

    const supported = kvm.supportedCpuid();
    // Guests program the LAPIC timer by TSC deadline where offered, as on hardware; without
    // it Linux falls back to the one-shot count mode.
    const tscDeadline = kvm.checkExtension(CAP.TSC_DEADLINE_TIMER) > 0;
    const starts: VcpuStart[] = [];
    for (let i = 0; i < cfg.cpus; i++) {
      starts.push({
        vmFd: vm.fd,
        index: i,
        runSize: kvm.vcpuMmapSize(),
        cpuid: encodeCpuid(normalizeCpuid(supported, i, cfg.cpus, cfg.cpuid, { tscDeadline })),
        msrs: BOOT_MSRS.map(([k, v]) => [k, v]),
        entry: i === 0 ? entry : null,
        sharedRegs: shared.buffer,
      });
    }
    const services = loop;
    const devices = virtio;
    const pciDevices = pci;
    machine = new Machine(
      memory,
      pio,
      mmio,
      hub,
      starts,
      { start: () => services.start(), release },
      {
        describeDevices: () => [
          ...devices.placed.map((p) => p.transport.core.describe()),
          ...pciDevices.placed.map((p) =>
            `00:${p.slot.toString(16).padStart(2, "0")}.0 ${p.transport.core.describe()}`
          ),
        ],
        refreshDevices: () => thread?.refresh() ?? Promise.resolve(),
        describeIrqchip: () => {
          try {
            return released.done ? [] : [describeIoapic(vm.getIrqchip(2))];
          } catch (e) {
            return [`ioapic: unreadable: ${(e as Error).message}`];
          }
        },
        pinVcpus: cfg.pinVcpus,
      },
    );
    return machine;
  } catch (e) {
    await release();
    throw e;
  }
}
