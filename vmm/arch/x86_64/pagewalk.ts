/** Guest virtual-to-physical translation through 4-level page tables (for crash reports). */

import type { GuestMemory } from "../../memory.ts";

const PRESENT = 1n;
const PAGE_SIZE_BIT = 0x80n;
const ADDR_MASK = 0x000f_ffff_ffff_f000n;

/** Translates `va` using the page tables at `cr3`; undefined if unmapped or outside RAM. */
export function translate(mem: GuestMemory, cr3: bigint, va: bigint): number | undefined {
  let table = cr3 & ADDR_MASK;
  const shifts = [39n, 30n, 21n, 12n];
  for (let level = 0; level < 4; level++) {
    const idx = (va >> shifts[level]) & 0x1ffn;
    const v = mem.tryView(Number(table + idx * 8n), 8);
    if (!v) return undefined;
    const e = new DataView(v.buffer, v.byteOffset, 8).getBigUint64(0, true);
    if (!(e & PRESENT)) return undefined;
    if ((level === 1 || level === 2) && (e & PAGE_SIZE_BIT)) {
      const pageMask = (1n << shifts[level]) - 1n;
      return Number(((e & ADDR_MASK) & ~pageMask) | (va & pageMask));
    }
    table = e & ADDR_MASK;
  }
  return Number(table | (va & 0xfffn));
}

/** Reads up to `n` instruction bytes at RIP, whatever the paging mode. */
export function readInstructionBytes(
  mem: GuestMemory,
  regs: { rip: bigint; cr0: bigint; cr3: bigint; csBase?: bigint },
  n = 15,
): number[] | undefined {
  const paging = (regs.cr0 & 0x8000_0000n) !== 0n;
  const va = paging ? regs.rip : regs.rip + (regs.csBase ?? 0n);
  const gpa = paging ? translate(mem, regs.cr3, va) : Number(va);
  if (gpa === undefined) return undefined;
  const v = mem.tryView(gpa, n) ?? mem.tryView(gpa, 1);
  return v ? Array.from(v) : undefined;
}

/** The page-table entries met translating `va` (for reports): "l4[511]=0x... l3[510]=0x0 not present". */
export function describeWalk(mem: GuestMemory, cr3: bigint, va: bigint): string {
  let table = cr3 & ADDR_MASK;
  const names = ["l4", "l3", "l2", "l1"];
  const shifts = [39n, 30n, 21n, 12n];
  const out: string[] = [];
  for (let level = 0; level < 4; level++) {
    const idx = (va >> shifts[level]) & 0x1ffn;
    const v = mem.tryView(Number(table + idx * 8n), 8);
    if (!v) return `${out.join(" ")} ${names[level]} table 0x${table.toString(16)} outside RAM`.trim();
    const e = new DataView(v.buffer, v.byteOffset, 8).getBigUint64(0, true);
    out.push(`${names[level]}[${idx}]=0x${e.toString(16)}`);
    if (!(e & PRESENT)) return `${out.join(" ")} not present`;
    if ((level === 1 || level === 2) && (e & PAGE_SIZE_BIT)) break;
    table = e & ADDR_MASK;
  }
  return out.join(" ");
}
