/** Guest virtual-to-physical translation through 4-level page tables (for crash reports). */

import type { GuestMemory } from "../../memory.ts";

const PRESENT = 1n;
const PAGE_SIZE_BIT = 0x80n;
const ADDR_MASK = 0x000f_ffff_ffff_f000n;

const LEVELS = [
  { name: "l4", shift: 39n },
  { name: "l3", shift: 30n },
  { name: "l2", shift: 21n },
  { name: "l1", shift: 12n },
];

/** One 4-level walk: the entries met, and the physical address or why there is none. */
interface Walk {
  /** "l4[511]=0x..." per entry read. */
  entries: string[];
  /** The translation, if the walk reached a present page. */
  gpa?: number;
  /** Why it stopped short. */
  failure?: string;
}

function walk(mem: GuestMemory, cr3: bigint, va: bigint): Walk {
  let table = cr3 & ADDR_MASK;
  const entries: string[] = [];
  for (let level = 0; level < LEVELS.length; level++) {
    const { name, shift } = LEVELS[level];
    const idx = (va >> shift) & 0x1ffn;
    const v = mem.tryView(Number(table + idx * 8n), 8);
    if (!v) return { entries, failure: `${name} table 0x${table.toString(16)} outside RAM` };
    const e = new DataView(v.buffer, v.byteOffset, 8).getBigUint64(0, true);
    entries.push(`${name}[${idx}]=0x${e.toString(16)}`);
    if (!(e & PRESENT)) return { entries, failure: "not present" };
    if ((level === 1 || level === 2) && (e & PAGE_SIZE_BIT)) {
      const pageMask = (1n << shift) - 1n;
      return { entries, gpa: Number(((e & ADDR_MASK) & ~pageMask) | (va & pageMask)) };
    }
    table = e & ADDR_MASK;
  }
  return { entries, gpa: Number(table | (va & 0xfffn)) };
}

/** Translates `va` using the page tables at `cr3`; undefined if unmapped or outside RAM. */
export function translate(mem: GuestMemory, cr3: bigint, va: bigint): number | undefined {
  return walk(mem, cr3, va).gpa;
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
  const w = walk(mem, cr3, va);
  return [...w.entries, ...(w.failure ? [w.failure] : [])].join(" ");
}
