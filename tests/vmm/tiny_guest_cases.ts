/**
 * Tiny guests: a few instructions of 64-bit code that touch ports and MMIO and write to the
 * UART, then power off through ACPI; a guest that hangs; vCPU pinning. They need a KVM but
 * not one that runs stock kernels, so they run on this host's /dev/kvm where it can be
 * opened (PVM included: tiny_guest_test.ts) and inside the nested runner's L1 where it
 * cannot (tests/nested/l1_main.ts).
 */

import assert from "node:assert/strict";
import { buildMachine } from "../../vmm/builder.ts";
import { bootTest, ConsoleTimeoutError, type Vm, waitForConsole } from "../../mod.ts";
import { vcpuThreadsLeftRunning } from "../../vmm/vcpus.ts";
import { Kvm } from "../../vmm/kvm.ts";
import { CAP } from "../../vmm/sys/kvm_abi.ts";
import { VmFd } from "../../vmm/vm.ts";
import { SHARED_CLEAR, sharedAccess, SharedRegisters } from "../../vmm/shared_regs.ts";
import { followIsr } from "../../vmm/isr_line.ts";
import { ioapicIrr } from "../../vmm/arch/x86_64/diag.ts";

/** One tiny-guest case. */
export interface TinyCase {
  /** Test name. */
  name: string;
  /** Runs the case; throws when what it names is broken. */
  run(): Promise<void>;
}

// Assembled from tests/vmm/tiny_guest.s (GNU as, .code64); see the comments there.
const GUEST = new Uint8Array([
  0x66,
  0xba,
  0xf8,
  0x03,
  0xb0,
  0x48,
  0xee,
  0xb0,
  0x69,
  0xee,
  0xb0,
  0x0a,
  0xee,
  0x66,
  0xba,
  0x10,
  0x05,
  0xb0,
  0x11,
  0xee,
  0x66,
  0xb8,
  0x33,
  0x22,
  0x66,
  0xef,
  0xb8,
  0x77,
  0x66,
  0x55,
  0x44,
  0xef,
  0xec,
  0x66,
  0xba,
  0x11,
  0x05,
  0xee,
  0x66,
  0xba,
  0x12,
  0x05,
  0x66,
  0xed,
  0x66,
  0xba,
  0x11,
  0x05,
  0x66,
  0xef,
  0x66,
  0xba,
  0x12,
  0x05,
  0xed,
  0x66,
  0xba,
  0x11,
  0x05,
  0xef,
  0x48,
  0xc7,
  0xc3,
  0x00,
  0x00,
  0x00,
  0x30,
  0xc6,
  0x03,
  0x12,
  0x66,
  0xc7,
  0x43,
  0x02,
  0x56,
  0x34,
  0xc7,
  0x43,
  0x04,
  0xde,
  0xbc,
  0x9a,
  0x78,
  0x48,
  0xb8,
  0x88,
  0x77,
  0x66,
  0x55,
  0x44,
  0x33,
  0x22,
  0x11,
  0x48,
  0x89,
  0x43,
  0x08,
  0x8b,
  0x43,
  0x10,
  0x66,
  0xba,
  0x11,
  0x05,
  0xef,
  0x48,
  0x8b,
  0x43,
  0x18,
  0x48,
  0x89,
  0x43,
  0x20,
  0x66,
  0xba,
  0x00,
  0x06,
  0xb0,
  0x34,
  0xee,
  0xf4,
]);

type Access = [string, number, number, string];

function le(d: Uint8Array): string {
  return Array.from(d).reverse().map((b) => b.toString(16).padStart(2, "0")).join("");
}

const exitsCase: TinyCase = {
  name: "tiny guest: port I/O and MMIO exits reach the buses with the right width and data; UART prints",
  run: async () => {
    const vm = await buildMachine({ program: { code: GUEST }, memoryMiB: 16 });
    const log: Access[] = [];
    let out = "";
    vm.console.onOutput((c) => out += new TextDecoder().decode(c));
    vm.pio.register(0x510, 3, {
      read: (o, d) => {
        const v = o === 0 ? 0xa5n : d.length === 2 ? 0xbeefn : 0xcafef00dn;
        for (let i = 0; i < d.length; i++) d[i] = Number((v >> BigInt(8 * i)) & 0xffn);
        log.push(["pio-r", 0x510 + o, d.length, le(d)]);
      },
      write: (o, d) => void log.push(["pio-w", 0x510 + o, d.length, le(d)]),
    }, "test port");
    vm.mmio.register(0x3000_0000, 0x100, {
      read: (o, d) => {
        const v = o === 16 ? 0x0badf00dn : 0x0102030405060708n;
        for (let i = 0; i < d.length; i++) d[i] = Number((v >> BigInt(8 * i)) & 0xffn);
        log.push(["mmio-r", o, d.length, le(d)]);
      },
      write: (o, d) => void log.push(["mmio-w", o, d.length, le(d)]),
    }, "test mmio");
    await vm.start();
    const exit = await vm.exited;
    assert.equal(exit.reason, "poweroff", exit.message);
    assert.equal(exit.code, 0);
    assert.equal(out, "Hi\n");
    assert.deepEqual(log, [
      ["pio-w", 0x510, 1, "11"],
      ["pio-w", 0x510, 2, "2233"],
      ["pio-w", 0x510, 4, "44556677"],
      ["pio-r", 0x510, 1, "a5"],
      ["pio-w", 0x511, 1, "a5"],
      ["pio-r", 0x512, 2, "beef"],
      ["pio-w", 0x511, 2, "beef"],
      ["pio-r", 0x512, 4, "cafef00d"],
      ["pio-w", 0x511, 4, "cafef00d"],
      ["mmio-w", 0, 1, "12"],
      ["mmio-w", 2, 2, "3456"],
      ["mmio-w", 4, 4, "789abcde"],
      ["mmio-w", 8, 8, "1122334455667788"],
      ["mmio-r", 16, 4, "0badf00d"],
      ["pio-w", 0x511, 4, "0badf00d"],
      ["mmio-r", 24, 8, "0102030405060708"],
      ["mmio-w", 32, 8, "0102030405060708"],
    ]);
  },
};

// Prints "spin\n" then loops forever (jmp .).
const SPINNER = new Uint8Array([
  0x66,
  0xba,
  0xf8,
  0x03, // mov dx, 0x3f8
  ...[..."spin\n"].flatMap((c) => [0xb0, c.charCodeAt(0), 0xee]), // mov al, c; out dx, al
  0xeb,
  0xfe, // jmp .
]);

const hungCase: TinyCase = {
  name: "tiny guest: a hung guest fails its boot test with the console tail, and is stopped",
  run: async () => {
    let vmRef: Vm | undefined;
    const leftBefore = vcpuThreadsLeftRunning();
    const config = { program: { code: SPINNER }, memoryMiB: 16, cpus: 2, rng: true };
    const err = await bootTest(config, async (vm) => {
      vmRef = vm;
      await waitForConsole(vm, /never printed/, 1500);
    }).then(() => undefined, (e) => e);
    assert.ok(err instanceof ConsoleTimeoutError, String(err));
    assert.match(err.message, /no \/never printed\/ on the console within 1500 ms/);
    assert.match(err.message, /--- console tail ---\nspin\n/);
    // Where the guest is: both vCPUs answered the kick (the spinner runs with interrupts off).
    assert.match(
      err.message,
      /\[cpu\]\nvCPU 0: rip=0x[0-9a-f]+ IF=0 runnable .*lapic irr=\[.* code=.* \| eb fe /,
    );
    assert.match(err.message, /\nvCPU 1: rip=0x[0-9a-f]+ IF=\d /);
    assert.match(err.message, /\nioapic: /);
    // The device report is current: the device thread's part was asked for before it was
    // printed (the rng was never started by this guest, so it has served nothing).
    assert.match(err.message, /\[devices\]\n.*virtio-rng .*\| thread: .*doorbell_to_irq_us=- \(0\)/);
    const exit = await vmRef!.wait();
    assert.equal(exit.reason, "stopped");
    // Both vCPU threads, spinning with interrupts off, left KVM_RUN on the stop's kick: none was
    // abandoned there.
    assert.equal(vcpuThreadsLeftRunning(), leftBefore, "vCPU threads that ignored the stop");
  },
};

const stallCase: TinyCase = {
  name:
    "tiny guest: a guest that stops making progress fails its console wait at the stall bound, not the timeout",
  run: async () => {
    const err = await bootTest({ program: { code: SPINNER }, memoryMiB: 16 }, async (vm) => {
      // The spinner prints once, then loops with no exit: no progress the VMM can see.
      await waitForConsole(vm, /never printed/, 600_000, 0, 2000);
    }).then(() => undefined, (e) => e);
    assert.ok(err instanceof ConsoleTimeoutError, String(err));
    assert.match(err.message, /no progress for 2000 ms \(no console output, device exit or virtio request\)/);
    assert.match(err.message, /--- console tail ---\nspin\n/);
    assert.match(err.message, /\[cpu\]\nvCPU 0: rip=0x[0-9a-f]+ IF=0 runnable /);
  },
};

/** Each thread of this process: [tid, name, the CPUs it may run on (Cpus_allowed_list)]. */
function affinities(): Array<[number, string, string]> {
  const out: Array<[number, string, string]> = [];
  for (const e of Deno.readDirSync("/proc/self/task")) {
    try {
      const st = Deno.readTextFileSync(`/proc/self/task/${e.name}/status`);
      out.push([Number(e.name), /Name:\s*(.*)/.exec(st)![1], /Cpus_allowed_list:\s*(\S+)/.exec(st)![1]]);
    } catch { /* the thread ended */ }
  }
  return out;
}

/** The CPUs a Cpus_allowed_list names, e.g. "0-2,5" -> [0, 1, 2, 5]. */
function cpuList(s: string): number[] {
  return s.split(",").flatMap((r) => {
    const [a, b] = r.split("-").map(Number);
    return Array.from({ length: (b ?? a) - a + 1 }, (_, i) => a + i);
  });
}

/** The CPUs this process may use (its Cpus_allowed_list), the first and the rest; needs two. */
function processCpus(): { before: string; vmm: number; rest: number[] } {
  const before = /Cpus_allowed_list:\s*(\S+)/.exec(Deno.readTextFileSync("/proc/self/status"))![1];
  const [vmm, ...rest] = cpuList(before);
  assert.ok(rest.length >= 1, `pinning needs 2 CPUs; this process may use ${before}`);
  return { before, vmm, rest };
}

const pinCase: TinyCase = {
  name:
    "tiny guest: pinVcpus gives the vCPUs CPUs of their own and the VMM's threads the first allowed one, and undoes it at the end",
  run: async () => {
    const { before, vmm, rest } = processCpus();
    await bootTest({ program: { code: SPINNER }, memoryMiB: 16, cpus: 2, pinVcpus: true }, async (vm) => {
      await waitForConsole(vm, /spin/, 5000);
      const a = affinities();
      const show = a.map(([, n, c]) => `${n}:${c}`).join(" ");
      assert.equal(a.find(([tid]) => tid === Deno.pid)?.[2], String(vmm), `main thread: ${show}`);
      // vCPU i on rest[i mod rest.length]: each of those CPUs runs a thread pinned to it alone
      // (the vCPU workers and any thread they start, e.g. KVM's own per-VM worker).
      const want = [rest[0], rest[1 % rest.length]];
      for (const cpu of want) {
        assert.ok(a.some(([, , c]) => c === String(cpu)), `a vCPU on CPU ${cpu}: ${show}`);
      }
      assert.ok(a.filter(([, , c]) => want.map(String).includes(c)).length >= 2, show);
      // The runtime's pools on the VMM's CPU.
      assert.ok(a.filter(([, n]) => /tokio|V8/.test(n)).every(([, , c]) => c === String(vmm)), show);
    });
    const after = affinities();
    assert.ok(
      after.every(([, , c]) => c === before),
      `after the VM (${before} before): ${after.map(([, n, c]) => `${n}:${c}`)}`,
    );
  },
};

const twoVmsPinCase: TinyCase = {
  name:
    "tiny guest: two VMs in one process, one pinned: the other's vCPUs keep every CPU, each VM's end leaves the other's threads where they are",
  run: async () => {
    const { before, vmm, rest } = processCpus();
    const cpusOf = (tid: number) => affinities().find(([t]) => t === tid)?.[2];
    const spin = { program: { code: SPINNER }, memoryMiB: 16, cpus: 1 };
    // Unpinned B runs first, pinned A starts, B is checked, A ends, B is checked again; then
    // pinned A' starts, unpinned B' starts while it runs, and B' is checked.
    await bootTest({ ...spin, pinVcpus: false }, async (b) => {
      await waitForConsole(b, /spin/, 5000);
      const [bTid] = b.vcpuThreadIds;
      await bootTest({ ...spin, pinVcpus: true }, async (a) => {
        await waitForConsole(a, /spin/, 5000);
        const [aTid] = a.vcpuThreadIds;
        assert.equal(cpusOf(aTid), String(rest[0]), "the pinned VM's vCPU");
        assert.equal(cpusOf(Deno.pid), String(vmm), "the main thread, while a pinned VM runs");
        assert.equal(cpusOf(bTid), before, "the unpinned VM's vCPU, after the other VM pinned");
      });
      assert.equal(cpusOf(bTid), before, "the unpinned VM's vCPU, after the pinned VM ended");
      assert.equal(cpusOf(Deno.pid), before, "the main thread, after the pinned VM ended");
    });
    await bootTest({ ...spin, pinVcpus: true }, async (a) => {
      await waitForConsole(a, /spin/, 5000);
      const [aTid] = a.vcpuThreadIds;
      await bootTest({ ...spin, pinVcpus: false }, async (b) => {
        await waitForConsole(b, /spin/, 5000);
        // Its thread started from the pinned main thread, with its single CPU.
        assert.equal(cpusOf(b.vcpuThreadIds[0]), before, "an unpinned VM's vCPU started while one is pinned");
        assert.equal(cpusOf(aTid), String(rest[0]), "the pinned VM's vCPU, while another VM runs");
      });
      assert.equal(cpusOf(aTid), String(rest[0]), "the pinned VM's vCPU, after the other VM ended");
      assert.equal(cpusOf(Deno.pid), String(vmm), "the main thread, while the pinned VM still runs");
    });
    const after = affinities();
    assert.ok(
      after.every(([, , c]) => c === before),
      `after both VMs (${before} before): ${after.map(([, n, c]) => `${n}:${c}`)}`,
    );
  },
};

const isrLineCase: TinyCase = {
  name:
    "KVM: virtio-MMIO's line is up exactly while InterruptStatus is not zero, with raises and InterruptACKs racing on two threads",
  run: async () => {
    const kvm = Kvm.open();
    const vm = new VmFd(kvm.createVm());
    try {
      vm.createIrqchip();
      const GSI = 5; // the first virtio-MMIO window's pin
      const ACK = 0xd000_0064;
      const table = new SharedRegisters(vm.fd);
      const isr = table.cell();
      table.map(ACK, SHARED_CLEAR, isr, GSI);
      const words = new Int32Array(table.buffer);
      // The line as KVM's IOAPIC has it (its IRR holds each pin's level).
      const lineUp = () => ((ioapicIrr(vm.getIrqchip(2)) >>> GSI) & 1) === 1;
      const ack = (bits: number) => sharedAccess(words, ACK, true, 4, new Uint8Array([bits, 0, 0, 0]));
      const agree = (when: string) =>
        assert.equal(lineUp(), Atomics.load(isr.array, isr.index) !== 0, `line vs ISR ${when}`);

      // One thread: a raise lifts the line, an ACK leaving a bit keeps it, the last bit drops it.
      assert.equal(lineUp(), false, "line before any raise");
      Atomics.or(isr.array, isr.index, 3);
      followIsr(vm.fd, GSI, isr.array, isr.index);
      assert.equal(lineUp(), true, "line after a raise");
      assert.equal(ack(1), true);
      assert.equal(lineUp(), true, "line with the config bit still set");
      assert.equal(ack(2), true);
      assert.equal(lineUp(), false, "line after the last bit was acknowledged");

      // Two threads: a Worker raises as the device thread does while this thread acknowledges
      // as a vCPU does; whichever order their KVM_IRQ_LINE calls land in, the line must agree
      // with the ISR once both have stopped, in many short rounds (each ends on a race).
      const ROUNDS = 200;
      const w = new Worker(new URL("./isr_line_worker.ts", import.meta.url), { type: "module" });
      try {
        const control = new Int32Array(new SharedArrayBuffer(8));
        const finished = new Promise((r) => w.onmessage = r);
        const job = {
          buffer: table.buffer,
          index: isr.index,
          vmFd: vm.fd,
          gsi: GSI,
          rounds: ROUNDS,
          raises: 5,
        };
        w.postMessage({ ...job, control: control.buffer });
        let acks = 0;
        for (let r = 1; r <= ROUNDS; r++) {
          Atomics.store(control, 0, r);
          Atomics.notify(control, 0);
          const t0 = Date.now();
          while (Atomics.load(control, 1) < r) {
            if (ack(1)) acks++;
            if (Date.now() - t0 > 60_000) throw new Error(`round ${r} did not finish`);
          }
          agree(`after round ${r}`);
        }
        await finished;
        assert.ok(acks >= ROUNDS * 5, `${acks} ACKs for ${ROUNDS * 5} raises`);
        ack(1);
        agree("after the last ACK");
      } finally {
        w.terminate();
      }
    } finally {
      vm.close();
      kvm.close();
    }
  },
};

// Assembled from tests/vmm/tiny_mmio_guest.s: reads virtio-MMIO registers and writes each
// value to port 0x511, makes one rng request and waits for its interrupt, powers off.
const MMIO_GUEST = Uint8Array.from(
  ("48c7042518a0000003002000b9830000d048890c25000420000f20d80f22d8bb000000d066ba11058b03ef8b4304ef8b" +
    "4308efc74330010000008b4334efc74330000000008b4334ef8b4360ef8b4370efc74370010000008b4370efc7437003" +
    "000000c74370070000008b4370efc74370000000008b4370efc7437003000000c7432401000000c7432001000000c743" +
    "700b000000c7433000000000c7433808000000c7838000000000003000c7838400000000000000c78390000000001030" +
    "00c7839400000000000000c783a000000000203000c783a400000000000000c7434401000000c743700f00000048c704" +
    "250000300000303000c70425080030001000000066c704250c003000020066c70425021030000100c74350000000000f" +
    "3148c1e2204809d048c7c70100000048c1e7224801c78b436085c075100f3148c1e2204809d04839f872eb31c066ba11" +
    "05ef8943648b4360ef0fb7042502203000ef66ba0006b034eef4").match(/../g)!,
  (h) => parseInt(h, 16),
);

const mmioPagesCase: TinyCase = {
  name:
    "tiny guest: virtio-MMIO register reads come from the read-only register page without exiting, and read what the exiting path reads",
  run: async () => {
    const kvm = Kvm.open();
    const readOnlyMemory = kvm.checkExtension(CAP.READONLY_MEM) > 0;
    if (readOnlyMemory) {
      // While several config words change, the window's slot is removed and mapped again
      // (vmm/virtio_mmio_bus.ts): KVM takes that sequence on a read-only slot of a table page.
      const vm = new VmFd(kvm.createVm());
      const page = new SharedRegisters().page();
      try {
        for (const size of [4096, 0, 4096]) vm.setUserMemoryRegion(0, 0xd000_0000, size, page.hostAddr, true);
      } finally {
        vm.close();
      }
    }
    kvm.close();
    const runs: Array<{ values: string[]; busReads: number }> = [];
    for (const mmioRegisterPages of [true, false]) {
      const vm = await buildMachine({
        program: { code: MMIO_GUEST },
        memoryMiB: 16,
        rng: { transport: "mmio" },
        mmioRegisterPages,
      });
      const values: string[] = [];
      vm.pio.register(0x511, 1, {
        read: (_o, d) => d.fill(0),
        write: (_o, d) => void values.push(le(d)),
      }, "test port");
      const before = vm.mmio.reads;
      // The guest gives up waiting for the interrupt after some seconds; a VM that hangs
      // anyway is stopped here and fails the case.
      const timer = setTimeout(() => void vm.stop(), 120_000);
      await vm.start();
      const exit = await vm.exited.finally(() => clearTimeout(timer));
      assert.equal(exit.reason, "poweroff", exit.message);
      runs.push({ values, busReads: vm.mmio.reads - before });
    }
    const expected = [
      "74726976", // "virt"
      "00000002", // version 2
      "00000004", // virtio-rng
      "00000000", // QueueNumMax of a queue that does not exist
      "00000100", // QueueNumMax of the request queue
      "00000000", // InterruptStatus
      "00000000", // Status
      "00000001", // Status after the driver's write
      "00000047", // DEVICE_NEEDS_RESET after DRIVER_OK without FEATURES_OK
      "00000000", // Status after a reset
      "00000001", // InterruptStatus once the device thread served the request
      "00000000", // InterruptStatus after the ACK
      "00000001", // used.idx
    ];
    assert.deepEqual(runs[0].values, expected, "with register pages");
    assert.deepEqual(runs[1].values, expected, "every access exiting");
    assert.equal(runs[1].busReads, 9, "reads that exit");
    // Where KVM lacks read-only memory the pages are off and every read exits.
    assert.equal(
      runs[0].busReads,
      readOnlyMemory ? 0 : 9,
      `reads that exited with the page (read-only memory: ${readOnlyMemory})`,
    );
  },
};

/** Every tiny-guest case, in the order they run. */
export const TINY_CASES: TinyCase[] = [
  exitsCase,
  mmioPagesCase,
  hungCase,
  stallCase,
  pinCase,
  twoVmsPinCase,
  isrLineCase,
];
