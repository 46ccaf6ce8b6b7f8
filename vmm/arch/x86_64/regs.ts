/**
 * Initial CPU state for the boot vCPU: GDT, identity page tables, segment registers,
 * control registers and general registers (as Firecracker and Cloud Hypervisor do).
 */

import type { GuestMemory } from "../../memory.ts";
import { REGS, SREGS } from "../../sys/kvm_abi.ts";
import { BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR } from "./layout.ts";

/** How the boot vCPU starts. */
export type EntryState =
  | { mode: "long64"; rip: number; rsi: number }
  | { mode: "pvh32"; rip: number; rbx: number };

const CR0_PE = 1;
const CR0_ET = 0x10;
const CR0_PG = 0x8000_0000;
const CR4_PAE = 0x20;
const EFER_LME = 0x100;
const EFER_LMA = 0x400;

/** A GDT descriptor from flags, base and limit (the kernel's GDT_ENTRY macro). */
export function gdtEntry(flags: number, base: number, limit: number): bigint {
  return (BigInt(base & 0xff000000) << 32n) | (BigInt(flags & 0xf0ff) << 40n) |
    (BigInt(limit & 0x000f0000) << 32n) | (BigInt(base & 0x00ffffff) << 16n) |
    BigInt(limit & 0xffff);
}

/** GDT for 64-bit boot: null, code, data, TSS. */
export const GDT_LONG: readonly bigint[] = [
  0n,
  gdtEntry(0xa09b, 0, 0xfffff),
  gdtEntry(0xc093, 0, 0xfffff),
  gdtEntry(0x808b, 0, 0xfffff),
];
/** GDT for the 32-bit PVH entry: null, 32-bit code, data, TSS. */
export const GDT_PVH: readonly bigint[] = [
  0n,
  gdtEntry(0xc09b, 0, 0xfffff),
  gdtEntry(0xc093, 0, 0xfffff),
  gdtEntry(0x008b, 0, 0x67),
];

/** Writes a kvm_segment for GDT entry `i` at byte offset `off` of sregs. */
function writeSegment(dv: DataView, off: number, entry: bigint, i: number): void {
  const e = entry;
  const base = Number(((e >> 16n) & 0xffffffn) | (((e >> 56n) & 0xffn) << 24n));
  const rawLimit = Number((e & 0xffffn) | (((e >> 48n) & 0xfn) << 16n));
  const g = Number((e >> 55n) & 1n);
  dv.setBigUint64(off, BigInt(base), true);
  dv.setUint32(off + 8, g ? ((rawLimit << 12) | 0xfff) >>> 0 : rawLimit, true);
  dv.setUint16(off + 12, i * 8, true);
  dv.setUint8(off + 14, Number((e >> 40n) & 0xfn)); // type
  dv.setUint8(off + 15, Number((e >> 47n) & 1n)); // present
  dv.setUint8(off + 16, Number((e >> 45n) & 3n)); // dpl
  dv.setUint8(off + 17, Number((e >> 54n) & 1n)); // db
  dv.setUint8(off + 18, Number((e >> 44n) & 1n)); // s
  dv.setUint8(off + 19, Number((e >> 53n) & 1n)); // l
  dv.setUint8(off + 20, g); // g
  dv.setUint8(off + 21, 0); // avl
  dv.setUint8(off + 22, Number(((e >> 47n) & 1n) ^ 1n)); // unusable
}

/** Writes the GDT, an empty IDT, and (for 64-bit entry) identity page tables for the first GiB. */
export function writeBootTables(mem: GuestMemory, mode: EntryState["mode"]): void {
  const gdt = mode === "long64" ? GDT_LONG : GDT_PVH;
  const g = mem.dataView(GDT_ADDR, gdt.length * 8);
  gdt.forEach((e, i) => g.setBigUint64(i * 8, e, true));
  mem.view(IDT_ADDR, 8).fill(0);
  if (mode !== "long64") return;
  const pml4 = mem.dataView(PML4_ADDR, 4096);
  const pdpt = mem.dataView(PDPT_ADDR, 4096);
  const pd = mem.dataView(PD_ADDR, 4096);
  new Uint8Array(pml4.buffer, pml4.byteOffset, 4096).fill(0);
  new Uint8Array(pdpt.buffer, pdpt.byteOffset, 4096).fill(0);
  pml4.setBigUint64(0, BigInt(PDPT_ADDR | 0x03), true);
  pdpt.setBigUint64(0, BigInt(PD_ADDR | 0x03), true);
  for (let i = 0; i < 512; i++) {
    // 2 MiB pages: present, writable, PS.
    pd.setBigUint64(i * 8, (BigInt(i) << 21n) | 0x83n, true);
  }
}

/** Edits a struct kvm_sregs (as read from KVM) for the given entry mode. */
export function applyBootSregs(sregs: Uint8Array, mode: EntryState["mode"]): void {
  const dv = new DataView(sregs.buffer, sregs.byteOffset, sregs.byteLength);
  const gdt = mode === "long64" ? GDT_LONG : GDT_PVH;
  writeSegment(dv, SREGS.cs, gdt[1], 1);
  for (const off of [SREGS.ds, SREGS.es, SREGS.fs, SREGS.gs, SREGS.ss]) {
    writeSegment(dv, off, gdt[2], 2);
  }
  writeSegment(dv, SREGS.tr, gdt[3], 3);
  dv.setBigUint64(SREGS.gdt, BigInt(GDT_ADDR), true);
  dv.setUint16(SREGS.gdt + 8, gdt.length * 8 - 1, true);
  dv.setBigUint64(SREGS.idt, BigInt(IDT_ADDR), true);
  dv.setUint16(SREGS.idt + 8, 7, true);
  if (mode === "long64") {
    const cr0 = Number(dv.getBigUint64(SREGS.cr0, true) & 0xffffffffn);
    dv.setBigUint64(SREGS.cr0, BigInt((cr0 | CR0_PE | CR0_PG | CR0_ET) >>> 0), true);
    dv.setBigUint64(SREGS.cr3, BigInt(PML4_ADDR), true);
    dv.setBigUint64(SREGS.cr4, BigInt(CR4_PAE), true);
    dv.setBigUint64(SREGS.efer, BigInt(EFER_LME | EFER_LMA), true);
  } else {
    dv.setBigUint64(SREGS.cr0, BigInt(CR0_PE | CR0_ET), true);
    dv.setBigUint64(SREGS.cr3, 0n, true);
    dv.setBigUint64(SREGS.cr4, 0n, true);
    dv.setBigUint64(SREGS.efer, 0n, true);
  }
}

/** A struct kvm_regs for the entry state. */
export function bootRegs(entry: EntryState): Uint8Array {
  const b = new Uint8Array(144);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(REGS.rflags, 2n, true);
  dv.setBigUint64(REGS.rip, BigInt(entry.rip), true);
  if (entry.mode === "long64") {
    dv.setBigUint64(REGS.rsi, BigInt(entry.rsi), true);
    dv.setBigUint64(REGS.rsp, BigInt(BOOT_STACK_ADDR), true);
    dv.setBigUint64(REGS.rbp, BigInt(BOOT_STACK_ADDR), true);
  } else {
    dv.setBigUint64(REGS.rbx, BigInt(entry.rbx), true);
  }
  return b;
}

/** Boot MSRs as Firecracker sets them: [index, value]. */
export const BOOT_MSRS: ReadonlyArray<readonly [number, bigint]> = [
  [0x174, 0n], // IA32_SYSENTER_CS
  [0x175, 0n], // IA32_SYSENTER_ESP
  [0x176, 0n], // IA32_SYSENTER_EIP
  [0xc0000081, 0n], // STAR
  [0xc0000083, 0n], // CSTAR
  [0xc0000102, 0n], // KERNEL_GS_BASE
  [0xc0000084, 0n], // SYSCALL_MASK
  [0xc0000082, 0n], // LSTAR
  [0x10, 0n], // IA32_TSC
  [0x1a0, 1n], // IA32_MISC_ENABLE: fast strings
  [0x2ff, (1n << 11n) | 6n], // MTRRdefType: enabled, write-back
];
