import { deepEqual, equal, ok, throws } from "node:assert/strict";
import {
  SHARED_CLEAR,
  SHARED_READ,
  SHARED_READ_CLEAR,
  sharedAccess,
  SharedRegisters,
} from "../../vmm/shared_regs.ts";
import { VirtioMmio } from "../../transports/mmio.ts";
import { REG } from "../../transports/mmio_core.ts";
import { GuestMemory } from "../../vmm/memory.ts";
import type { ActivateContext, VirtioDevice } from "../../devices/virtio/device.ts";

const le = (v: number) => new Uint8Array([v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24]);

Deno.test("shared registers: a mapped read returns the cell, a mapped write clears bits, others fall through", () => {
  const t = new SharedRegisters();
  const c = t.cell();
  t.map(0xd000_0060, SHARED_READ, c);
  t.map(0xd000_0064, SHARED_CLEAR, c);
  const w = new Int32Array(t.buffer);
  Atomics.store(c.array, c.index, 0b111);
  const d = new Uint8Array(8);
  equal(sharedAccess(w, 0xd000_0060, false, 4, d), true);
  deepEqual([...d.subarray(0, 4)], [7, 0, 0, 0]);
  equal(sharedAccess(w, 0xd000_0064, true, 4, le(0b101)), true);
  equal(Atomics.load(c.array, c.index), 0b010);
  // Not ours: other widths, other addresses, a write to the read-only register, a read of ACK.
  equal(sharedAccess(w, 0xd000_0060, false, 2, d), false);
  equal(sharedAccess(w, 0xd000_0068, false, 4, d), false);
  equal(sharedAccess(w, 0x1_d000_0060, false, 4, d), false);
  equal(sharedAccess(w, 0xd000_0060, true, 4, le(0)), false);
  equal(sharedAccess(w, 0xd000_0064, false, 4, d), false);
  equal(Atomics.load(c.array, c.index), 0b010);
});

Deno.test("shared registers: a read-to-clear register (PCI's ISR) in port or memory space, moved or turned off", () => {
  const t = new SharedRegisters();
  const c = t.cell();
  const port = t.map(0xc013, SHARED_READ_CLEAR, c, undefined, true);
  const mem = t.map(0xc000_1000, SHARED_READ_CLEAR, c);
  const w = new Int32Array(t.buffer);
  const d = new Uint8Array(8);
  Atomics.store(c.array, c.index, 0b11);
  equal(sharedAccess(w, 0xc013, false, 1, d, true), true, "a one-byte port read");
  equal(d[0], 3);
  equal(Atomics.load(c.array, c.index), 0, "the read cleared it");
  equal(sharedAccess(w, 0xc013, false, 1, d, true), true);
  equal(d[0], 0, "and the next read sees zero");
  Atomics.store(c.array, c.index, 1);
  // Not ours: the same number in the other space, another width, a write.
  equal(sharedAccess(w, 0xc013, false, 1, d), false, "memory address 0xc013 is not the port");
  equal(sharedAccess(w, 0xc000_1000, false, 1, d, true), false, "port 0xc0001000 is not the memory");
  equal(sharedAccess(w, 0xc013, false, 4, d, true), false);
  equal(sharedAccess(w, 0xc013, true, 1, d, true), false);
  equal(Atomics.load(c.array, c.index), 1, "none of those touched the cell");
  equal(sharedAccess(w, 0xc000_1000, false, 1, d), true);
  equal(d[0], 1);
  // The BAR moves: the old address falls through to the device thread, the new one answers.
  Atomics.store(c.array, c.index, 2);
  t.move(mem, 0xc010_1000);
  equal(sharedAccess(w, 0xc000_1000, false, 1, d), false);
  equal(Atomics.load(c.array, c.index), 2);
  equal(sharedAccess(w, 0xc010_1000, false, 1, d), true);
  equal(d[0], 2);
  // Decoding off: nowhere; on again at the same place: back.
  t.move(port, undefined);
  equal(sharedAccess(w, 0xc013, false, 1, d, true), false);
  t.move(port, 0xc013);
  equal(sharedAccess(w, 0xc013, false, 1, d, true), true);
  throws(() => t.move(7, 0), /no shared register/);
});

Deno.test("shared registers: a line needs a clearing register and a table made for a VM", () => {
  const noVm = new SharedRegisters();
  throws(() => noVm.map(0xd000_0064, SHARED_CLEAR, noVm.cell(), 5), /VM fd/);
  const t = new SharedRegisters(3);
  throws(() => t.map(0xd000_0060, SHARED_READ, t.cell(), 5), /clearing register/);
});

Deno.test("shared registers: cells belong to their table", () => {
  const a = new SharedRegisters();
  const b = new SharedRegisters();
  throws(() => a.map(0x1000, SHARED_READ, b.cell()), /another table/);
});

Deno.test("virtio-mmio InterruptStatus/ACK answered from the shared cell agree with the register file", () => {
  const t = new SharedRegisters();
  const isr = t.cell();
  const base = 0xd000_0000;
  t.map(base + REG.interruptStatus, SHARED_READ, isr);
  t.map(base + REG.interruptAck, SHARED_CLEAR, isr);
  let ctx: ActivateContext | undefined;
  const dev: VirtioDevice = {
    deviceType: 4,
    name: "test",
    features: 0n,
    queueMaxSizes: [8],
    readConfig: (_o, d) => d.fill(0),
    writeConfig: () => {},
    activate: (c) => ctx = c,
    notify: () => {},
    reset: () => ctx = undefined,
  };
  let irqs = 0;
  const mem = new GuestMemory([{ gpa: 0, bytes: new Uint8Array(0x10000) }]);
  const m = new VirtioMmio(dev, mem, { trigger: () => irqs++ }, isr);
  const w32 = (o: number, v: number) => m.write(o, le(v));
  w32(REG.status, 1);
  w32(REG.status, 3);
  w32(REG.driverFeaturesSel, 1);
  w32(REG.driverFeatures, 1); // word 1: VERSION_1
  w32(REG.status, 11);
  w32(REG.queueSel, 0);
  w32(REG.queueNum, 8);
  w32(0x080, 0x1000);
  w32(0x090, 0x2000);
  w32(0x0a0, 0x3000);
  w32(REG.queueReady, 1);
  w32(REG.status, 15);
  equal(ctx !== undefined, true, "device activated");
  ctx!.interrupt.signalUsed(0);
  equal(irqs, 1);
  const words = new Int32Array(t.buffer);
  const d = new Uint8Array(4);
  equal(sharedAccess(words, base + REG.interruptStatus, false, 4, d), true);
  equal(d[0], 1, "the vCPU side sees the used-ring bit");
  const viaFile = new Uint8Array(4);
  m.read(REG.interruptStatus, viaFile);
  equal(viaFile[0], 1, "the register file reads the same cell");
  equal(sharedAccess(words, base + REG.interruptAck, true, 4, le(1)), true);
  equal(m.core.interruptStatus, 0, "an ACK on the vCPU side clears the core's status");
  ctx!.interrupt.signalUsed(0);
  w32(REG.status, 0);
  equal(Atomics.load(isr.array, isr.index), 0, "reset clears the shared status");
});

Deno.test("shared pages: page-aligned in the host's address space, inside the table's buffer, distinct, cells at their offset", () => {
  const table = new SharedRegisters();
  const base = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(table.buffer))));
  const pages = Array.from({ length: 16 }, () => table.page());
  for (const [i, p] of pages.entries()) {
    equal(p.hostAddr % 4096n, 0n, `page ${i} aligned`);
    equal(BigInt(p.at * 4), p.hostAddr - base, `page ${i}'s first word is at its address`);
    ok(
      p.hostAddr >= base && p.hostAddr + 4096n <= base + BigInt(table.buffer.byteLength),
      `page ${i} inside`,
    );
    if (i > 0) equal(p.hostAddr - pages[i - 1].hostAddr, 4096n, "pages one after the other");
  }
  // The cells a table hands out stay clear of the pages.
  const cells = Array.from({ length: 64 }, () => table.cell());
  ok(cells.every((c) => c.index < pages[0].at), "cells before the first page");
  const isr = table.cellIn(pages[3], 0x060);
  equal(isr.index, pages[3].at + 0x18);
  Atomics.store(isr.array, isr.index, 5);
  equal(new DataView(table.buffer).getUint32(pages[3].at * 4 + 0x60, true), 5);
  throws(() => table.page(), RangeError, "at most 16 pages");
  throws(() => table.cellIn(pages[0], 2), RangeError, "a cell is a whole word");
  throws(() => new SharedRegisters().cellIn(pages[0], 0), RangeError, "another table's page");
});
