/** The boot cases' dmesg check: what the allowlist lets through and what fails a case. */

import assert from "node:assert/strict";
import { unexpectedDmesg } from "./cases.ts";

const SRSO = "[    0.42] Speculative Return Stack Overflow: WARNING: See " +
  "https://kernel.org/doc/html/latest/admin-guide/hw-vuln/srso.html for mitigation options.";
const XSTATE = "[    0.42] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:605 " +
  "fpu__init_system_xstate+0x85a/0xb19";

function consoleWith(lines: string[]): string {
  return `TSVMM-INIT-MARKER kernel=x cpus=1\r\n${lines.map((l) => `TSVMM-DMESG ${l}\r\n`).join("")}` +
    `TSVMM-CHECK dmesg lines=300 flagged=${lines.length}\r\nTSVMM-CHECKS-DONE\r\n`;
}

Deno.test("dmesg check: the emulated CPU's known lines pass, with the call trace of its warning", () => {
  assert.deepEqual(unexpectedDmesg(consoleWith([])), []);
  assert.deepEqual(unexpectedDmesg(consoleWith([SRSO, XSTATE, "[    0.42] Call Trace:"])), []);
});

Deno.test("dmesg check: any other warning, BUG, ACPI or firmware line, or a lone call trace fails", () => {
  for (
    const l of [
      "[    1.0] i8042: Warning: Keylock active",
      "[    1.0] WARNING: CPU: 0 PID: 1 at drivers/virtio/virtio_ring.c:100 vring_foo+0x1/0x2",
      "[    1.0] BUG: kernel NULL pointer dereference, address: 0000000000000000",
      "[    1.0] ACPI Error: AE_NOT_FOUND, While resolving a named reference package element",
      "[    1.0] ACPI Warning: \\_SB.VR00: Return type mismatch",
      "[    1.0] [Firmware Bug]: TSC doesn't count with P0 frequency!",
    ]
  ) {
    assert.deepEqual(unexpectedDmesg(consoleWith([SRSO, l])), [l], l);
  }
  assert.deepEqual(unexpectedDmesg(consoleWith([SRSO, "[    1.0] Call Trace:"])), ["[    1.0] Call Trace:"]);
});

Deno.test("dmesg check: a case whose guest did not run the check, or lost lines, fails", () => {
  assert.throws(() => unexpectedDmesg("TSVMM-CHECKS-DONE\r\n"), /dmesg check did not run/);
  const lost = consoleWith([SRSO]).replace("flagged=1", "flagged=2");
  assert.throws(() => unexpectedDmesg(lost), /flagged 2 dmesg lines, the console shows 1/);
});
