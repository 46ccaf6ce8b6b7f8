/**
 * CPUID normalisation per vCPU: APIC IDs, topology (one socket, one thread per core,
 * N cores), the hypervisor bit, and user bit masks. Pure functions (unit-tested).
 */

import type { CpuidEntry } from "../../kvm.ts";

/** KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the subleaf matters. */
const SIGNIFICANT_INDEX = 1;

/** A CPUID register name. */
export type CpuidReg = "eax" | "ebx" | "ecx" | "edx";

/** One user change to a CPUID bit. */
export interface CpuidBitChange {
  /** Leaf. */
  leaf: number;
  /** Subleaf (0 when the leaf has none). */
  subleaf: number;
  /** Register. */
  reg: CpuidReg;
  /** Bit number 0-31. */
  bit: number;
  /** true sets the bit, false clears it. */
  set: boolean;
}

/** Named feature bits users can mask. */
export const CPUID_FEATURES: Record<string, [number, number, CpuidReg, number]> = {
  sse3: [1, 0, "ecx", 0],
  pclmulqdq: [1, 0, "ecx", 1],
  ssse3: [1, 0, "ecx", 9],
  fma: [1, 0, "ecx", 12],
  cx16: [1, 0, "ecx", 13],
  pcid: [1, 0, "ecx", 17],
  "sse4.1": [1, 0, "ecx", 19],
  "sse4.2": [1, 0, "ecx", 20],
  x2apic: [1, 0, "ecx", 21],
  movbe: [1, 0, "ecx", 22],
  popcnt: [1, 0, "ecx", 23],
  "tsc-deadline": [1, 0, "ecx", 24],
  aes: [1, 0, "ecx", 25],
  xsave: [1, 0, "ecx", 26],
  avx: [1, 0, "ecx", 28],
  f16c: [1, 0, "ecx", 29],
  rdrand: [1, 0, "ecx", 30],
  hypervisor: [1, 0, "ecx", 31],
  fsgsbase: [7, 0, "ebx", 0],
  bmi1: [7, 0, "ebx", 3],
  avx2: [7, 0, "ebx", 5],
  smep: [7, 0, "ebx", 7],
  bmi2: [7, 0, "ebx", 8],
  erms: [7, 0, "ebx", 9],
  invpcid: [7, 0, "ebx", 10],
  avx512f: [7, 0, "ebx", 16],
  rdseed: [7, 0, "ebx", 18],
  adx: [7, 0, "ebx", 19],
  smap: [7, 0, "ebx", 20],
  umip: [7, 0, "ecx", 2],
  pku: [7, 0, "ecx", 3],
  la57: [7, 0, "ecx", 16],
  rdpid: [7, 0, "ecx", 22],
  pdpe1gb: [0x80000001, 0, "edx", 26],
  rdtscp: [0x80000001, 0, "edx", 27],
};

/**
 * Parses a mask list such as `-cx16,-xsave,+0x1:ecx:31,-7.0:ebx:8`.
 * Each item is `+` (set) or `-` (clear) followed by a feature name or `LEAF[.SUB]:REG:BIT`.
 */
export function parseCpuidMask(spec: string): CpuidBitChange[] {
  const out: CpuidBitChange[] = [];
  for (const raw of spec.split(",").map((s) => s.trim()).filter(Boolean)) {
    const sign = raw[0];
    if (sign !== "+" && sign !== "-") {
      throw new TypeError(`CPUID mask item "${raw}" must start with + or -`);
    }
    const body = raw.slice(1).toLowerCase();
    const named = CPUID_FEATURES[body];
    if (named) {
      out.push({ leaf: named[0], subleaf: named[1], reg: named[2], bit: named[3], set: sign === "+" });
      continue;
    }
    const m = /^(0x[0-9a-f]+|\d+)(?:\.(0x[0-9a-f]+|\d+))?:(eax|ebx|ecx|edx):(\d+)$/.exec(body);
    if (!m || Number(m[4]) > 31) {
      throw new TypeError(
        `CPUID mask item "${raw}" is neither a known feature (${
          Object.keys(CPUID_FEATURES).join(", ")
        }) nor LEAF[.SUBLEAF]:REG:BIT`,
      );
    }
    out.push({
      leaf: Number(m[1]),
      subleaf: m[2] ? Number(m[2]) : 0,
      reg: m[3] as CpuidReg,
      bit: Number(m[4]),
      set: sign === "+",
    });
  }
  return out;
}

function log2ceil(n: number): number {
  let s = 0;
  while ((1 << s) < n) s++;
  return s;
}

/**
 * The CPUID table for vCPU `index` of `cpus`: a copy of KVM's supported table with
 * APIC ID and topology filled in, the hypervisor bit set, the TSC-deadline timer bit set
 * when KVM emulates it (KVM_CAP_TSC_DEADLINE_TIMER: KVM's table never shows it, the VMM
 * must), and the user's changes applied.
 */
export function normalizeCpuid(
  supported: readonly CpuidEntry[],
  index: number,
  cpus: number,
  changes: readonly CpuidBitChange[] = [],
  opts: { tscDeadline?: boolean } = {},
): CpuidEntry[] {
  const out = supported.map((e) => ({ ...e }));
  const coreShift = log2ceil(cpus);
  for (const e of out) {
    switch (e.fn) {
      case 1:
        // EBX: [31:24] initial APIC ID, [23:16] logical processors, [15:8] CLFLUSH line / 8.
        e.ebx = ((index << 24) | ((cpus & 0xff) << 16) | (8 << 8) | (e.ebx & 0xff)) >>> 0;
        e.ecx = (e.ecx | (1 << 31)) >>> 0; // hypervisor
        if (opts.tscDeadline) e.ecx = (e.ecx | (1 << 24)) >>> 0;
        if (cpus > 1) e.edx = (e.edx | (1 << 28)) >>> 0; // HTT: EBX[23:16] valid
        else e.edx = (e.edx & ~(1 << 28)) >>> 0;
        break;
      case 4: {
        // Deterministic cache parameters: cores per package and sharing per level.
        const level = (e.eax >>> 5) & 7;
        const sharing = level >= 3 ? cpus - 1 : 0;
        e.eax = ((e.eax & 0x3fff) | (sharing << 14) | ((cpus - 1) << 26)) >>> 0;
        break;
      }
      case 0xb:
      case 0x1f: {
        // Extended topology: level 0 = SMT (1 thread), level 1 = core (cpus), then invalid.
        e.flags |= SIGNIFICANT_INDEX;
        e.edx = index;
        if (e.index === 0) {
          e.eax = 0;
          e.ebx = 1;
          e.ecx = (1 << 8) | 0;
        } else if (e.index === 1) {
          e.eax = coreShift;
          e.ebx = cpus;
          e.ecx = (2 << 8) | 1;
        } else {
          e.eax = 0;
          e.ebx = 0;
          e.ecx = e.index;
        }
        break;
      }
      case 0x80000008:
        // AMD: ECX[7:0] cores - 1, ECX[15:12] APIC ID bits for the core.
        e.ecx = ((e.ecx & ~0xf0ff) | ((cpus - 1) & 0xff) | (coreShift << 12)) >>> 0;
        break;
      case 0x8000001e:
        // AMD: extended APIC ID; one thread per core; core id; one node.
        e.eax = index;
        e.ebx = index & 0xff;
        e.ecx = 0;
        break;
    }
  }
  for (const c of changes) {
    let e = out.find((x) => x.fn === c.leaf && x.index === c.subleaf);
    if (!e && c.set) {
      e = { fn: c.leaf, index: c.subleaf, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0 };
      out.push(e);
    }
    if (!e) continue;
    e[c.reg] = c.set ? (e[c.reg] | (1 << c.bit)) >>> 0 : (e[c.reg] & ~(1 << c.bit)) >>> 0;
  }
  return out;
}
