import assert from "node:assert/strict";
import { normalizeCpuid, parseCpuidMask } from "../../vmm/arch/x86_64/cpuid.ts";
import type { CpuidEntry } from "../../vmm/kvm.ts";

const e = (fn: number, index: number, r: Partial<CpuidEntry> = {}): CpuidEntry => ({
  fn,
  index,
  flags: 0,
  eax: 0,
  ebx: 0,
  ecx: 0,
  edx: 0,
  ...r,
});

const SUPPORTED: CpuidEntry[] = [
  e(0, 0, { eax: 0x10 }),
  e(1, 0, { eax: 0x00a00f11, ebx: 0xff0000aa, ecx: 0x0000_2000 | (1 << 26), edx: 0x178bfbff }),
  e(4, 0, { eax: (1 << 5) | 0x1 }),
  e(4, 3, { eax: (3 << 5) | 0x3 }),
  e(0xb, 0, { flags: 1 }),
  e(0xb, 1, { flags: 1 }),
  e(0x80000008, 0, { ecx: 0xffff }),
];

const find = (t: CpuidEntry[], fn: number, index = 0) => t.find((x) => x.fn === fn && x.index === index)!;

Deno.test("CPUID: leaf 1 carries each vCPU's APIC ID, the CPU count and the hypervisor bit", () => {
  for (const i of [0, 1, 3]) {
    const t = normalizeCpuid(SUPPORTED, i, 4);
    const l1 = find(t, 1);
    assert.equal(l1.ebx >>> 24, i, "initial APIC ID");
    assert.equal((l1.ebx >>> 16) & 0xff, 4, "logical processor count");
    assert.equal((l1.ebx >>> 8) & 0xff, 8, "CLFLUSH line size / 8");
    assert.equal(l1.ebx & 0xff, 0xaa, "brand index kept");
    assert.ok(l1.ecx & (1 << 31), "hypervisor bit");
    assert.ok(l1.edx & (1 << 28), "HTT with 4 CPUs");
  }
  assert.equal(find(normalizeCpuid(SUPPORTED, 0, 1), 1).edx & (1 << 28), 0, "no HTT with 1 CPU");
});

Deno.test("CPUID: topology leaves describe N cores of one thread each", () => {
  const t = normalizeCpuid(SUPPORTED, 2, 4);
  assert.deepEqual([find(t, 0xb, 0).eax, find(t, 0xb, 0).ebx, find(t, 0xb, 0).ecx, find(t, 0xb, 0).edx], [
    0,
    1,
    0x100,
    2,
  ]);
  assert.deepEqual([find(t, 0xb, 1).eax, find(t, 0xb, 1).ebx, find(t, 0xb, 1).ecx, find(t, 0xb, 1).edx], [
    2,
    4,
    0x201,
    2,
  ]);
  assert.equal(find(t, 4, 0).eax >>> 26, 3, "cores per package - 1");
  assert.equal((find(t, 4, 3).eax >>> 14) & 0xfff, 3, "L3 shared by all cores");
  assert.equal((find(t, 4, 0).eax >>> 14) & 0xfff, 0, "L1 private");
  assert.equal(find(t, 0x80000008).ecx & 0xff, 3, "AMD NC");
  assert.equal((find(t, 0x80000008).ecx >>> 12) & 0xf, 2, "AMD ApicIdCoreIdSize");
});

Deno.test("CPUID: user masks clear and set bits; the supported table is not modified", () => {
  const before = JSON.stringify(SUPPORTED);
  const t = normalizeCpuid(SUPPORTED, 0, 1, parseCpuidMask("-cx16,-xsave,+0x1:ecx:0,-1:edx:0"));
  const l1 = find(t, 1);
  assert.equal(l1.ecx & (1 << 13), 0);
  assert.equal(l1.ecx & (1 << 26), 0);
  assert.equal(l1.ecx & 1, 1);
  assert.equal(l1.edx & 1, 0);
  assert.equal(JSON.stringify(SUPPORTED), before);
  assert.deepEqual(parseCpuidMask("-7.0:ebx:8"), [{ leaf: 7, subleaf: 0, reg: "ebx", bit: 8, set: false }]);
  assert.throws(() => parseCpuidMask("cx16"), /must start with \+ or -/);
  assert.throws(() => parseCpuidMask("-nosuch"), /neither a known feature/);
  assert.throws(() => parseCpuidMask("-1:ecx:32"), /neither a known feature/);
});

Deno.test("CPUID: the TSC-deadline timer bit follows KVM's capability, and a user mask still wins", () => {
  const bit = 1 << 24;
  assert.equal(find(normalizeCpuid(SUPPORTED, 0, 1), 1).ecx & bit, 0, "not without the capability");
  assert.equal(find(normalizeCpuid(SUPPORTED, 0, 1, [], { tscDeadline: true }), 1).ecx & bit, bit);
  const masked = normalizeCpuid(SUPPORTED, 0, 1, parseCpuidMask("-tsc-deadline"), { tscDeadline: true });
  assert.equal(find(masked, 1).ecx & bit, 0);
});
