/** Exit round trip on this host's KVM: a tiny guest doing N port writes (or MMIO writes) to a device. */

import { buildMachine } from "../../vmm/builder.ts";

function loopGuest(n: number, mmio: boolean): Uint8Array {
  const imm = [n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, n >>> 24];
  const body = mmio
    ? [0x48, 0xc7, 0xc3, 0x00, 0x00, 0x00, 0x30, 0x89, 0x03, 0xff, 0xc9, 0x75, 0xfa] // mov rbx,0x30000000; l: mov [rbx],eax; dec ecx; jnz l
    : [0x66, 0xba, 0x10, 0x05, 0xee, 0xff, 0xc9, 0x75, 0xfb]; // mov dx,0x510; l: out dx,al; dec ecx; jnz l
  return new Uint8Array([
    0xb9,
    ...imm, // mov ecx, n
    ...body,
    0x66,
    0xba,
    0x00,
    0x06,
    0xb0,
    0x34,
    0xee, // ACPI S5
    0xf4,
  ]);
}

/** Microseconds per exit, median over `rounds` runs of `n` exits. */
export async function exitRoundTrip(kind: "pio" | "mmio", n = 20_000, rounds = 5): Promise<number[]> {
  const out: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const vm = await buildMachine({ program: { code: loopGuest(n, kind === "mmio") }, memoryMiB: 16 });
    let count = 0;
    const dev = { read: () => {}, write: () => void count++ };
    if (kind === "pio") vm.pio.register(0x510, 1, dev, "bench port");
    else vm.mmio.register(0x3000_0000, 8, dev, "bench mmio");
    const t0 = performance.now();
    await vm.start();
    const exit = await vm.exited;
    const us = ((performance.now() - t0) * 1000) / n;
    if (exit.reason !== "poweroff" || count !== n) {
      throw new Error(`bench guest: ${exit.message}, ${count} exits`);
    }
    out.push(us);
  }
  return out;
}
