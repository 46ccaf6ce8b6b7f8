/**
 * Exit round trip: a tiny guest doing N port writes (or MMIO writes) to a device, on
 * whatever /dev/kvm this process has (the host's, or L1's inside the nested runner),
 * and the same loop in the smallest C VMM (exit_floor.c) as the floor.
 */

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

/**
 * Microseconds per exit, one figure per round of `n` exits, each also handed to `onRound`
 * as it is measured; a round past `timeoutMs` throws with the hung-guest report. `pin`:
 * the vCPU thread on a CPU of its own, every other thread on the first (`pinVcpus`).
 */
export async function exitRoundTrip(
  kind: "pio" | "mmio",
  n = 20_000,
  rounds = 5,
  timeoutMs = 120_000,
  onRound?: (us: number) => void,
  pin = false,
): Promise<number[]> {
  const out: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const vm = await buildMachine({
      program: { code: loopGuest(n, kind === "mmio") },
      memoryMiB: 16,
      pinVcpus: pin,
    });
    // Timed from the first exit to the last, as the C floor times its loop: the VM's and
    // threads' start-up is not part of an exit.
    let count = 0;
    let first = 0;
    let last = 0;
    const dev = {
      read: () => {},
      // Only the first and the last exit read the clock (a clock read is not free in L1).
      write: () => {
        count++;
        if (count === 1) first = performance.now();
        else if (count === n) last = performance.now();
      },
    };
    if (kind === "pio") vm.pio.register(0x510, 1, dev, "bench port");
    else vm.mmio.register(0x3000_0000, 8, dev, "bench mmio");
    await vm.start();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const hung = new Promise<"hung">((res) => timer = setTimeout(() => res("hung"), timeoutMs));
    const done = await Promise.race([vm.exited, hung]);
    clearTimeout(timer);
    if (done === "hung") {
      const report = (await vm.diagnose()).join("\n");
      await vm.stop();
      throw new Error(
        `the ${kind} exit guest did not finish within ${timeoutMs} ms (${count} exits)\n${report}`,
      );
    }
    const exit = done;
    const us = ((last - first) * 1000) / (n - 1);
    if (exit.reason !== "poweroff" || count !== n) {
      throw new Error(`bench guest: ${exit.message}, ${count} exits`);
    }
    out.push(us);
    onRound?.(us);
  }
  return out;
}

/**
 * Builds the C floor (exit_floor.c, statically linked, so it also runs inside the nested
 * runner's L1) into `dir`; returns its path, or throws saying why it could not be built.
 */
export async function buildExitFloor(dir: string): Promise<string> {
  const out = `${dir}/exit_floor`;
  const src = new URL("./exit_floor.c", import.meta.url).pathname;
  let r: Deno.CommandOutput;
  try {
    r = await new Deno.Command("cc", { args: ["-O2", "-static", "-o", out, src], stderr: "piped" }).output();
  } catch (e) {
    throw new Error(`cannot build the C floor: no C compiler (cc): ${(e as Error).message}`);
  }
  if (!r.success) throw new Error(`cannot build the C floor: ${new TextDecoder().decode(r.stderr).trim()}`);
  return out;
}

/**
 * Microseconds per exit of the C floor, one figure per round; throws with its error output.
 * `cpu`: the program runs on that CPU only.
 */
export async function exitFloor(
  binary: string,
  n = 20_000,
  rounds = 5,
  timeoutMs = 120_000,
  cpu?: number,
): Promise<number[]> {
  const child = new Deno.Command(binary, {
    args: [String(n), String(rounds), ...(cpu === undefined ? [] : ["/dev/kvm", String(cpu)])],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
  const r = await child.output();
  clearTimeout(timer);
  const text = new TextDecoder().decode(r.stdout);
  const us = text.trim().split("\n").filter(Boolean).map(Number);
  if (!r.success || us.length !== rounds || !us.every((x) => x > 0)) {
    throw new Error(
      `the C floor failed (exit ${r.code}${r.signal ? `, ${r.signal}` : ""}): ${text.trim()} ` +
        new TextDecoder().decode(r.stderr).trim(),
    );
  }
  return us;
}
