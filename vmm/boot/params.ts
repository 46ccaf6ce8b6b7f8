/**
 * Boot information the kernel reads: the e820 map, the zero page (struct boot_params,
 * Documentation/arch/x86/zero-page.rst) and the PVH start_info (xen/interface/hvm/start_info.h).
 * Pure byte builders with golden tests.
 */

import {
  EBDA_START,
  ECAM_SIZE,
  ECAM_START,
  HIMEM_START,
  RAM_32BIT_END,
  RAM_64BIT_START,
} from "../arch/x86_64/layout.ts";

/** e820 entry types. */
export const E820_RAM = 1;
/** Reserved. */
export const E820_RESERVED = 2;

/** One e820 entry. */
export interface E820Entry {
  /** Start address. */
  addr: number;
  /** Length in bytes. */
  size: number;
  /** E820_RAM or E820_RESERVED. */
  type: number;
}

/** The memory map for `memSize` bytes of RAM. */
export function e820Map(memSize: number): E820Entry[] {
  const map: E820Entry[] = [
    { addr: 0, size: EBDA_START, type: E820_RAM },
    { addr: EBDA_START, size: HIMEM_START - EBDA_START, type: E820_RESERVED },
    { addr: HIMEM_START, size: Math.min(memSize, RAM_32BIT_END) - HIMEM_START, type: E820_RAM },
    { addr: ECAM_START, size: ECAM_SIZE, type: E820_RESERVED },
  ];
  if (memSize > RAM_32BIT_END) {
    map.push({ addr: RAM_64BIT_START, size: memSize - RAM_32BIT_END, type: E820_RAM });
  }
  return map;
}

/** Zero page offsets (struct boot_params). */
export const BP = {
  acpiRsdpAddr: 0x070,
  extRamdiskImage: 0x0c0,
  extRamdiskSize: 0x0c4,
  extCmdLinePtr: 0x0c8,
  e820Entries: 0x1e8,
  hdr: 0x1f1,
  bootFlag: 0x1fe,
  header: 0x202,
  typeOfLoader: 0x210,
  loadflags: 0x211,
  ramdiskImage: 0x218,
  ramdiskSize: 0x21c,
  heapEndPtr: 0x224,
  cmdLinePtr: 0x228,
  kernelAlignment: 0x230,
  e820Table: 0x2d0,
  size: 4096,
} as const;

const LOADED_HIGH = 0x01;
const CAN_USE_HEAP = 0x80;
const E820_MAX_ENTRIES_ZEROPAGE = 128;

/** Inputs to the zero page. */
export interface ZeroPageInput {
  /** The bzImage setup header to copy, or undefined for an ELF kernel. */
  setupHeader?: Uint8Array;
  /** Guest address of the NUL-terminated command line. */
  cmdlineAddr: number;
  /** Initrd placement, if any. */
  initrd?: { addr: number; size: number };
  /** RSDP address. */
  rsdpAddr: number;
  /** Memory map. */
  e820: E820Entry[];
}

/** Builds struct boot_params. */
export function buildZeroPage(input: ZeroPageInput): Uint8Array {
  const zp = new Uint8Array(BP.size);
  const dv = new DataView(zp.buffer);
  if (input.setupHeader) {
    zp.set(input.setupHeader, BP.hdr);
  } else {
    dv.setUint16(BP.bootFlag, 0xaa55, true);
    dv.setUint32(BP.header, 0x53726448, true); // "HdrS"
    dv.setUint32(BP.kernelAlignment, 0x0100_0000, true);
  }
  zp[BP.typeOfLoader] = 0xff; // undefined loader
  zp[BP.loadflags] |= LOADED_HIGH | CAN_USE_HEAP;
  dv.setUint16(BP.heapEndPtr, 0xfe00, true);
  dv.setUint32(BP.cmdLinePtr, input.cmdlineAddr >>> 0, true);
  dv.setUint32(BP.extCmdLinePtr, Math.floor(input.cmdlineAddr / 2 ** 32), true);
  if (input.initrd) {
    dv.setUint32(BP.ramdiskImage, input.initrd.addr >>> 0, true);
    dv.setUint32(BP.ramdiskSize, input.initrd.size >>> 0, true);
    dv.setUint32(BP.extRamdiskImage, Math.floor(input.initrd.addr / 2 ** 32), true);
    dv.setUint32(BP.extRamdiskSize, Math.floor(input.initrd.size / 2 ** 32), true);
  }
  dv.setBigUint64(BP.acpiRsdpAddr, BigInt(input.rsdpAddr), true);
  const n = Math.min(input.e820.length, E820_MAX_ENTRIES_ZEROPAGE);
  zp[BP.e820Entries] = n;
  for (let i = 0; i < n; i++) {
    const e = input.e820[i];
    const o = BP.e820Table + i * 20;
    dv.setBigUint64(o, BigInt(e.addr), true);
    dv.setBigUint64(o + 8, BigInt(e.size), true);
    dv.setUint32(o + 16, e.type, true);
  }
  return zp;
}

/** PVH start_info magic ("xEn3" with the top bit of the first byte set). */
export const PVH_MAGIC = 0x336ec578;

/** Builds hvm_start_info (version 1) plus its module list and memory map, laid out from `base`. */
export function buildPvhStartInfo(
  base: number,
  input: {
    cmdlineAddr: number;
    rsdpAddr: number;
    e820: E820Entry[];
    initrd?: { addr: number; size: number };
  },
): Uint8Array {
  const modlist = base + 0x40;
  const memmap = base + 0x80;
  const buf = new Uint8Array(0x80 + input.e820.length * 24);
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, PVH_MAGIC, true);
  dv.setUint32(4, 1, true);
  if (input.initrd) {
    dv.setUint32(12, 1, true);
    dv.setBigUint64(16, BigInt(modlist), true);
    dv.setBigUint64(0x40, BigInt(input.initrd.addr), true);
    dv.setBigUint64(0x48, BigInt(input.initrd.size), true);
  }
  dv.setBigUint64(24, BigInt(input.cmdlineAddr), true);
  dv.setBigUint64(32, BigInt(input.rsdpAddr), true);
  dv.setBigUint64(40, BigInt(memmap), true);
  dv.setUint32(48, input.e820.length, true);
  input.e820.forEach((e, i) => {
    const o = 0x80 + i * 24;
    dv.setBigUint64(o, BigInt(e.addr), true);
    dv.setBigUint64(o + 8, BigInt(e.size), true);
    dv.setUint32(o + 16, e.type, true);
  });
  return buf;
}
