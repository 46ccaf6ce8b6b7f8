/**
 * The smallest VM: eight bytes of 64-bit code that print "hi" on the serial port and
 * power off through the ACPI sleep register. Run: deno run -A examples/hello_kvm.ts
 */

import { createVm } from "../mod.ts";

const code = new Uint8Array([
  0x66,
  0xba,
  0xf8,
  0x03, // mov dx, 0x3f8 (COM1)
  0xb0,
  0x68,
  0xee, // mov al, 'h'; out dx, al
  0xb0,
  0x69,
  0xee, // mov al, 'i'; out dx, al
  0xb0,
  0x0a,
  0xee, // mov al, '\n'; out dx, al
  0x66,
  0xba,
  0x00,
  0x06, // mov dx, 0x600 (ACPI sleep control)
  0xb0,
  0x34,
  0xee, // mov al, SLP_TYP 5 | SLP_EN; out dx, al
  0xf4, // hlt
]);

const vm = await createVm({ program: { code }, memoryMiB: 16 });
const printed = vm.output.pipeTo(Deno.stdout.writable, { preventClose: true });
await vm.start();
const exit = await vm.wait();
await printed;
console.log(exit);
