/**
 * Puts a kernel, its initrd and command line into guest memory and writes the boot
 * information it reads (zero page or PVH start_info), returning how to enter it.
 */

import type { GuestMemory } from "../memory.ts";
import type { EntryState } from "../arch/x86_64/regs.ts";
import { writeBootTables } from "../arch/x86_64/regs.ts";
import {
  CMDLINE_ADDR,
  HIMEM_START,
  PVH_INFO_ADDR,
  RAM_32BIT_END,
  ZERO_PAGE_ADDR,
} from "../arch/x86_64/layout.ts";
import { kernelExtent, type KernelImage, X86_COMMAND_LINE_SIZE } from "./kernel_image.ts";
import { buildPvhStartInfo, buildZeroPage, e820Map } from "./params.ts";
import type { BootProtocol } from "../config.ts";
import { ConfigError } from "../config.ts";

/** Inputs for loading. */
export interface LoadInput {
  /** The parsed kernel. */
  kernel: KernelImage;
  /** Initrd bytes. */
  initrd?: Uint8Array;
  /** Command line. */
  cmdline: string;
  /** RAM size in bytes. */
  memSize: number;
  /** RSDP address (tables already written). */
  rsdpAddr: number;
  /** Entry protocol choice for ELF kernels. */
  protocol: BootProtocol;
}

const PAGE = 4096;
const MIB = 1024 * 1024;

/** Where the initrd goes, once a kernel, initrd, command line and RAM size are known to fit. */
export interface LoadPlan {
  /** The command line's bytes (without the terminating NUL). */
  cmd: Uint8Array;
  /** The initrd's place in guest memory, if there is one. */
  initrd?: { addr: number; size: number };
  /** Whether an ELF kernel is entered through PVH. */
  usePvh: boolean;
}

/**
 * Checks that the command line, kernel and initrd fit this kernel and RAM size, and the
 * entry protocol exists, without touching guest memory (so it runs before KVM is opened);
 * throws ConfigError with a one-line message.
 */
export function planKernelLoad(input: Omit<LoadInput, "rsdpAddr">): LoadPlan {
  const k = input.kernel;
  const cmd = new TextEncoder().encode(input.cmdline);
  const cmdMax = k.kind === "bzimage" ? k.cmdlineSize : X86_COMMAND_LINE_SIZE - 1;
  if (cmd.length > cmdMax) {
    throw new ConfigError(
      `Kernel command line is ${cmd.length} bytes; this kernel accepts at most ${cmdMax}`,
    );
  }
  const lowRamEnd = Math.min(input.memSize, RAM_32BIT_END);
  const ext = kernelExtent(k, HIMEM_START);
  const initrdSize = input.initrd?.length ?? 0;
  const needMiB = Math.ceil((ext.end + initrdSize + PAGE) / MIB);
  if (ext.end > lowRamEnd) {
    throw new ConfigError(
      `--memory ${input.memSize / MIB} MiB is too small for this kernel: it needs at least ${needMiB} MiB`,
    );
  }

  let initrd: { addr: number; size: number } | undefined;
  if (input.initrd) {
    const max = k.kind === "bzimage" ? Math.min(lowRamEnd, k.initrdAddrMax + 1) : lowRamEnd;
    const addr = Math.floor((max - initrdSize) / PAGE) * PAGE;
    if (addr < ext.end) {
      throw new ConfigError(
        `--memory ${
          input.memSize / MIB
        } MiB is too small for this kernel and initrd: they need at least ${needMiB} MiB`,
      );
    }
    initrd = { addr, size: initrdSize };
  }
  const usePvh = k.kind === "elf" &&
    (input.protocol === "pvh" || (input.protocol === "auto" && k.pvhEntry !== undefined));
  if (usePvh && k.kind === "elf" && k.pvhEntry === undefined) {
    throw new ConfigError("This kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)");
  }
  return { cmd, initrd, usePvh };
}

/** Loads everything and returns the boot vCPU's entry state. */
export function loadKernel(mem: GuestMemory, input: LoadInput): EntryState {
  const k = input.kernel;
  const { cmd, initrd, usePvh } = planKernelLoad(input);
  if (initrd) mem.write(initrd.addr, input.initrd!);

  const cmdBuf = mem.view(CMDLINE_ADDR, cmd.length + 1);
  cmdBuf.set(cmd);
  cmdBuf[cmd.length] = 0;
  const e820 = e820Map(input.memSize);

  if (k.kind === "bzimage") {
    mem.write(HIMEM_START, k.payload);
    mem.write(
      ZERO_PAGE_ADDR,
      buildZeroPage({
        setupHeader: k.header,
        cmdlineAddr: CMDLINE_ADDR,
        initrd,
        rsdpAddr: input.rsdpAddr,
        e820,
      }),
    );
    writeBootTables(mem, "long64");
    return { mode: "long64", rip: HIMEM_START + 0x200, rsi: ZERO_PAGE_ADDR };
  }

  for (const s of k.segments) mem.write(s.paddr, s.data);
  if (usePvh) {
    mem.write(
      PVH_INFO_ADDR,
      buildPvhStartInfo(PVH_INFO_ADDR, { cmdlineAddr: CMDLINE_ADDR, rsdpAddr: input.rsdpAddr, e820, initrd }),
    );
    writeBootTables(mem, "pvh32");
    return { mode: "pvh32", rip: k.pvhEntry!, rbx: PVH_INFO_ADDR };
  }
  mem.write(
    ZERO_PAGE_ADDR,
    buildZeroPage({ cmdlineAddr: CMDLINE_ADDR, initrd, rsdpAddr: input.rsdpAddr, e820 }),
  );
  writeBootTables(mem, "long64");
  return { mode: "long64", rip: k.entry, rsi: ZERO_PAGE_ADDR };
}
