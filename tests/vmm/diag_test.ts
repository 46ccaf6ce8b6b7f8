import assert from "node:assert/strict";
import { describeIoapic, describeVcpu, lapicVectors } from "../../vmm/arch/x86_64/diag.ts";
import { describeWalk, translate } from "../../vmm/arch/x86_64/pagewalk.ts";
import { GuestMemory } from "../../vmm/memory.ts";

Deno.test("diag: LAPIC vector registers decode to vector numbers", () => {
  const lapic = new Uint8Array(1024);
  const dv = new DataView(lapic.buffer);
  dv.setUint32(0x200, 1 << 5, true); // IRR vector 0x05
  dv.setUint32(0x200 + 16 * 1, 1 << 1, true); // 0x21
  dv.setUint32(0x200 + 16 * 7, 1 << 31, true); // 0xff
  dv.setUint32(0x100 + 16 * 1, 1 << 1, true); // ISR 0x21
  assert.deepEqual(lapicVectors(lapic, 0x200), [0x05, 0x21, 0xff]);
  assert.deepEqual(lapicVectors(lapic, 0x100), [0x21]);
  const events = new Uint8Array(64);
  events[8] = 1; // interrupt.injected
  events[9] = 0x21;
  events[11] = 1; // interrupt shadow
  const line = describeVcpu(1, { rip: 0xffffffff81000000n, rflags: 0x202n, mpState: 3, lapic, events });
  assert.match(
    line,
    /^vCPU 1: rip=0xffffffff81000000 IF=1 halted injecting=0x21 shadow=1 lapic irr=\[0x5,0x21,0xff\] isr=\[0x21\]/,
  );
});

Deno.test("diag: the IOAPIC line lists unmasked, remote-IRR and asserted pins only", () => {
  const st = new Uint8Array(512);
  const dv = new DataView(st.buffer);
  const entry = (vector: number, level: boolean, masked: boolean, remoteIrr: boolean) =>
    BigInt(vector) | (BigInt(remoteIrr) << 14n) | (BigInt(level) << 15n) | (BigInt(masked) << 16n);
  for (let p = 0; p < 24; p++) dv.setBigUint64(24 + p * 8, entry(0, false, true, false), true);
  dv.setBigUint64(24 + 4 * 8, entry(0x24, false, false, false), true);
  dv.setBigUint64(24 + 16 * 8, entry(0x31, true, false, true), true);
  dv.setUint32(16, 1 << 16, true); // irr: pin 16 asserted
  assert.equal(describeIoapic(st), "ioapic: 4:0x24/edge 16:0x31/level/remote-irr/asserted");
  assert.equal(
    describeIoapic(new Uint8Array(512).fill(0xff).fill(0, 16, 24)),
    "ioapic: " +
      Array.from({ length: 24 }, (_, p) => `${p}:0xff/level/masked/remote-irr`).join(" "),
  );
});

Deno.test("diag: page walks translate and describe 4-level tables, large pages and holes", () => {
  const ram = new Uint8Array(0x10_0000);
  const mem = new GuestMemory([{ gpa: 0, bytes: ram }]);
  const dv = new DataView(ram.buffer);
  dv.setBigUint64(0x1000, 0x2003n, true); // l4[0] -> l3 at 0x2000
  dv.setBigUint64(0x2000, 0x3003n, true); // l3[0] -> l2 at 0x3000
  dv.setBigUint64(0x3000, 0x83n, true); // l2[0]: 2 MiB page at 0
  dv.setBigUint64(0x3008, 0x4003n, true); // l2[1] -> l1 at 0x4000
  dv.setBigUint64(0x4000 + 5 * 8, 0x7003n, true); // l1[5]: 4 KiB page at 0x7000
  assert.equal(translate(mem, 0x1000n, 0x1234n), 0x1234);
  assert.equal(translate(mem, 0x1000n, 0x20_5010n), 0x7010);
  assert.equal(describeWalk(mem, 0x1000n, 0x1234n), "l4[0]=0x2003 l3[0]=0x3003 l2[0]=0x83");
  assert.equal(translate(mem, 0x1000n, 0x20_6000n), undefined);
  assert.equal(
    describeWalk(mem, 0x1000n, 0x20_6000n),
    "l4[0]=0x2003 l3[0]=0x3003 l2[1]=0x4003 l1[6]=0x0 not present",
  );
  assert.equal(describeWalk(mem, 0xf000_0000n, 0n), "l4 table 0xf0000000 outside RAM");
});
