import assert from "node:assert/strict";
import { RX_FIFO_SIZE, Serial } from "../../devices/legacy/serial.ts";

function uart() {
  const out: number[] = [];
  const irq: boolean[] = [];
  const s = new Serial({ output: (b) => out.push(b), setIrq: (l) => irq.push(l) });
  const rd = (o: number) => {
    const d = new Uint8Array(1);
    s.read(o, d);
    return d[0];
  };
  const wr = (o: number, v: number) => s.write(o, new Uint8Array([v]));
  return { s, out, irq, rd, wr };
}

Deno.test("UART: bytes written to THR come out; LSR says the transmitter is empty", () => {
  const u = uart();
  for (const c of "ok\n") u.wr(0, c.charCodeAt(0));
  assert.equal(String.fromCharCode(...u.out), "ok\n");
  assert.equal(u.rd(5) & 0x60, 0x60);
});

Deno.test("UART: divisor latch and scratch registers read back", () => {
  const u = uart();
  u.wr(3, 0x83);
  u.wr(0, 0x01);
  u.wr(1, 0x00);
  assert.equal(u.rd(0), 0x01);
  u.wr(3, 0x03);
  u.wr(7, 0x5a);
  assert.equal(u.rd(7), 0x5a);
  assert.deepEqual(u.out, [], "DLL writes are not output");
});

Deno.test("UART: loopback MSR bits follow MCR as Linux's 8250 probe checks (0x90)", () => {
  const u = uart();
  u.wr(4, 0x10 | 0x0a);
  assert.equal(u.rd(6) & 0xf0, 0x90);
  u.wr(4, 0x10 | 0x01);
  assert.equal(u.rd(6) & 0xf0, 0x20);
  u.wr(0, 0x41);
  assert.equal(u.rd(5) & 1, 1, "looped byte is received");
  assert.equal(u.rd(0), 0x41);
  assert.deepEqual(u.out, []);
});

Deno.test("UART: RX interrupt raised while data waits, dropped when drained; FIFO is bounded", () => {
  const u = uart();
  u.wr(1, 0x01);
  assert.equal(u.s.enqueueInput(new TextEncoder().encode("ab")), 2);
  assert.deepEqual(u.irq, [true]);
  assert.equal(u.rd(2) & 0x0f, 0x04);
  assert.equal(u.rd(0), 0x61);
  assert.equal(u.rd(0), 0x62);
  assert.deepEqual(u.irq, [true, false]);
  assert.equal(u.rd(2) & 0x0f, 0x01);
  assert.equal(u.s.enqueueInput(new Uint8Array(1000)), RX_FIFO_SIZE);
});

Deno.test("UART: THRE interrupt on enable and after each byte, acknowledged by reading IIR; FIFO bits", () => {
  const u = uart();
  u.wr(2, 0x01);
  u.wr(1, 0x02);
  assert.deepEqual(u.irq, [true]);
  assert.equal(u.rd(2), 0xc2);
  assert.deepEqual(u.irq, [true, false]);
  u.wr(0, 0x41);
  assert.deepEqual(u.irq, [true, false, true]);
});
