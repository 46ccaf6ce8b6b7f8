/**
 * Tiny guests (tiny_guest_cases.ts) on this host's /dev/kvm when it can be opened, PVM
 * included. Where it cannot, the same cases run inside the nested runner's L1, as steps
 * of the nested test in tests/boot/boot_test.ts; nothing is skipped.
 */

import { TINY_CASES } from "./tiny_guest_cases.ts";
import { hostKvmUsable } from "../nested/runner.ts";

if (hostKvmUsable()) {
  for (const c of TINY_CASES) Deno.test(c.name, () => c.run());
} else {
  console.error(
    "tiny guests: this host's /dev/kvm cannot be opened; they run inside the nested runner's L1 " +
      '(the "KVM tests in the nested runner" test of tests/boot/boot_test.ts)',
  );
}
