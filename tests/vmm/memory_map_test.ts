/** Guest RAM's host mapping: 2 MiB-aligned, so KVM can map it with huge pages. */

import assert from "node:assert/strict";
import { HUGE_PAGE, mmapAnonymous, sysMunmap } from "../../vmm/sys/libc.ts";

Deno.test("guest RAM starts on a 2 MiB boundary whatever its size, and all of it is usable", () => {
  // Sizes that are not a multiple of 2 MiB: a kernel that aligns large anonymous mappings by
  // itself does so only for multiples, so these show whether the VMM aligns.
  for (const size of [(64 << 20) + 4096, (3 << 20) + 12288, (256 << 20) + 8192, 5 << 20]) {
    const p = mmapAnonymous(size);
    const at = Deno.UnsafePointer.value(p) as bigint;
    try {
      assert.equal(at % BigInt(HUGE_PAGE), 0n, `0x${at.toString(16)} for ${size} bytes`);
      const bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(p, size));
      bytes[0] = 1;
      bytes[size - 1] = 2;
      assert.deepEqual([bytes[0], bytes[size - 1]], [1, 2]);
    } finally {
      sysMunmap(p, size);
    }
  }
});
