/** GuestMemory's bounds-checked accessors: whole inside one region, or refused with nothing touched. */

import assert from "node:assert/strict";
import { GuestMemory } from "../../vmm/memory.ts";

function twoRegions() {
  const low = new Uint8Array(0x1000);
  const high = new Uint8Array(0x1000);
  const mem = new GuestMemory([{ gpa: 0x1_0000_0000, bytes: high }, { gpa: 0, bytes: low }]);
  return { low, high, mem };
}

Deno.test("guest memory: u16, setU16 and setU32Pair are little-endian, in the right region", () => {
  const { low, high, mem } = twoRegions();
  assert.equal(mem.setU16(0xffe, 0xbeef), true);
  assert.deepEqual([low[0xffe], low[0xfff]], [0xef, 0xbe]);
  assert.equal(mem.u16(0xffe), 0xbeef);
  assert.equal(mem.setU32Pair(0x1_0000_0ff8, 0x11223344, 0xaabbccdd), true);
  assert.deepEqual(Array.from(high.subarray(0xff8)), [0x44, 0x33, 0x22, 0x11, 0xdd, 0xcc, 0xbb, 0xaa]);
  assert.equal(mem.regionOf(0x1_0000_0000, 0x1000), 1);
  assert.equal(mem.viewOfRegion(1).getUint32(0xff8, true), 0x11223344);
});

Deno.test("guest memory: an access that leaves its region, or any RAM, is refused and stores nothing", () => {
  const { low, high, mem } = twoRegions();
  const before = [low.slice(), high.slice()];
  assert.equal(mem.u16(0xfff), -1); // one byte past the end of the low region
  assert.equal(mem.setU16(0xfff, 0xffff), false);
  assert.equal(mem.setU32Pair(0xffc, 1, 2), false); // the second word is outside
  assert.equal(mem.setU32Pair(0x1_0000_0ffc, 1, 2), false);
  assert.equal(mem.u16(0x2000), -1); // in the hole between the regions
  assert.equal(mem.u16(0x1000), -1);
  for (const bad of [-2, 0.5, 2 ** 53, NaN, Infinity]) {
    assert.equal(mem.u16(bad), -1, `u16(${bad})`);
    assert.equal(mem.setU16(bad, 1), false, `setU16(${bad})`);
    assert.equal(mem.regionOf(bad, 2), -1, `regionOf(${bad})`);
  }
  assert.equal(mem.regionOf(0, -1), -1);
  assert.equal(mem.regionOf(0, 0x1001), -1);
  assert.deepEqual([low, high], before);
});

Deno.test("guest memory: a ring index stored by one thread is never read half-old, half-new by another", async () => {
  // Its own process, with V8's optimizing compilers off (--max-opt=1): the tiers a device
  // thread's code runs in for its first thousands of requests, where a DataView stored and
  // loaded a u16 one byte at a time (hundreds of torn reads a second here).
  const probe = new URL("./ring_index_probe.ts", import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--max-opt=1", probe, "1000"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.ok(out.success && /ring-index-probe ok/.test(text), `probe failed (exit ${out.code}):\n${text}`);
});

Deno.test("guest memory: u16 and u32 pairs at any alignment, and in a region that starts on an odd byte", () => {
  const backing = new Uint8Array(0x2003);
  // Aligned, starting on an odd byte, starting 2 bytes past a 4-byte boundary, of odd length.
  for (
    const bytes of [
      backing.subarray(0, 0x2000),
      backing.subarray(1),
      backing.subarray(2, 0x2002),
      backing.subarray(0, 0x2003),
    ]
  ) {
    const mem = new GuestMemory([{ gpa: 0x4000, bytes }]);
    for (const at of [0x4000, 0x4001, 0x4002, 0x4003]) {
      assert.ok(mem.setU16(at, 0xbeef));
      assert.equal(mem.u16(at), 0xbeef);
      assert.deepEqual([...bytes.subarray(at - 0x4000, at - 0x4000 + 2)], [0xef, 0xbe], "little-endian");
      assert.ok(mem.setU32Pair(at + 8, 0x11223344, 0xaabbccdd));
      const dv = new DataView(bytes.buffer, bytes.byteOffset + at - 0x4000 + 8, 8);
      assert.equal(dv.getUint32(0, true), 0x11223344);
      assert.equal(dv.getUint32(4, true), 0xaabbccdd);
    }
    // The last whole u16 and u32 pair of the region.
    const lastU16 = 0x4000 + bytes.length - 2 - ((bytes.byteOffset + bytes.length) % 2);
    assert.ok(mem.setU16(lastU16, 0x5aa5));
    assert.equal(mem.u16(lastU16), 0x5aa5);
    const lastPair = 0x4000 + bytes.length - 8 - ((bytes.byteOffset + bytes.length) % 4);
    assert.ok(mem.setU32Pair(lastPair, 1, 2));
    assert.equal(
      new DataView(bytes.buffer, bytes.byteOffset + lastPair - 0x4000 + 4, 4).getUint32(0, true),
      2,
    );
    assert.equal(mem.u16(0x4000 + bytes.length - 1), -1, "straddles the end");
    assert.equal(mem.setU16(0x4000 + bytes.length - 1, 1), false);
  }
});

Deno.test("guest memory: ring accessors past 2 GiB and 4 GiB into a region, and in a region that starts past 2 GiB", () => {
  // One 5 GiB buffer (untouched pages cost nothing), split as the VMM splits guest RAM around
  // the hole below 4 GiB: [0, 3 GiB) at 0 and [3 GiB, 5 GiB) at 4 GiB.
  const GIB = 2 ** 30;
  const host = new ArrayBuffer(5 * GIB);
  const low = new Uint8Array(host, 0, 3 * GIB);
  const high = new Uint8Array(host, 3 * GIB, 2 * GIB);
  const mem = new GuestMemory([{ gpa: 0, bytes: low }, { gpa: 4 * GIB, bytes: high }]);
  const dv = new DataView(host);
  for (
    const [gpa, hostOff] of [[2 * GIB + 6, 2 * GIB + 6], [3 * GIB - 8, 3 * GIB - 8], [
      4 * GIB + 4,
      3 * GIB + 4,
    ], [
      6 * GIB - 8,
      5 * GIB - 8,
    ]]
  ) {
    assert.ok(mem.setU16(gpa, 0x1234));
    assert.equal(dv.getUint16(hostOff, true), 0x1234, `u16 at 0x${gpa.toString(16)}`);
    dv.setUint16(hostOff, 0xabcd, true);
    assert.equal(mem.u16(gpa), 0xabcd);
    assert.ok(mem.setU32Pair(gpa, 0xdeadbeef, 7));
    assert.equal(dv.getUint32(hostOff, true), 0xdeadbeef);
    assert.equal(dv.getUint32(hostOff + 4, true), 7);
  }
  assert.equal(mem.u16(3 * GIB), -1, "the hole");
  assert.equal(mem.setU32Pair(6 * GIB - 4, 1, 2), false, "past the end");
});
