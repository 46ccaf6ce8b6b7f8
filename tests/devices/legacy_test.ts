import assert from "node:assert/strict";
import { I8042, I8042_CMD, I8042_DATA } from "../../devices/legacy/i8042.ts";
import { AcpiPm, RESET, SLEEP_CONTROL } from "../../devices/legacy/acpi_pm.ts";

Deno.test("i8042: self-test, CTR round trip, idle status, and reset on 0xfe", () => {
  let resets = 0;
  let irqs = 0;
  const k = new I8042({ reset: () => resets++, interrupt: () => irqs++ });
  const rd = (o: number) => {
    const d = new Uint8Array(1);
    k.read(o, d);
    return d[0];
  };
  const wr = (o: number, v: number) => k.write(o, new Uint8Array([v]));
  assert.equal(rd(I8042_CMD) & 0x03, 0, "idle: no output, input buffer empty");
  wr(I8042_CMD, 0xaa);
  assert.equal(rd(I8042_CMD) & 1, 1);
  assert.equal(rd(I8042_DATA), 0x55);
  wr(I8042_CMD, 0x60);
  wr(I8042_DATA, 0x65);
  wr(I8042_CMD, 0x20);
  assert.equal(rd(I8042_DATA), 0x65);
  assert.ok(irqs > 0, "keyboard interrupt once enabled in CTR");
  wr(I8042_DATA, 0xff);
  assert.deepEqual([rd(I8042_DATA), rd(I8042_DATA)], [0xfa, 0xaa]);
  assert.equal(resets, 0);
  wr(I8042_CMD, 0xfe);
  assert.equal(resets, 1);
});

Deno.test("i8042: the status register says the keyboard is not locked (bit 4 set), whatever the guest does", () => {
  const k = new I8042({ reset: () => {}, interrupt: () => {} });
  const status = () => {
    const d = new Uint8Array(1);
    k.read(I8042_CMD, d);
    return d[0];
  };
  const wr = (o: number, v: number) => k.write(o, new Uint8Array([v]));
  assert.equal(status() & 0x10, 0x10, "idle");
  wr(I8042_CMD, 0xaa); // self-test: output pending
  assert.equal(status() & 0x11, 0x11, "with output pending");
  const d = new Uint8Array(1);
  k.read(I8042_DATA, d);
  wr(I8042_CMD, 0x60); // write CTR: command bit set until the data byte
  assert.equal(status() & 0x18, 0x18, "mid-command");
  wr(I8042_DATA, 0x47);
  assert.equal(status() & 0x10, 0x10, "after the command");
});

Deno.test("ACPI power: S5 with SLP_EN powers off; other values and the reset value act as specified", () => {
  const ev: string[] = [];
  const pm = new AcpiPm({ powerOff: () => ev.push("off"), reset: () => ev.push("reset") }, 1);
  pm.write(SLEEP_CONTROL, new Uint8Array([5 << 2])); // no SLP_EN
  pm.write(SLEEP_CONTROL, new Uint8Array([(3 << 2) | 0x20])); // S3: not supported
  assert.deepEqual(ev, []);
  pm.write(SLEEP_CONTROL, new Uint8Array([(5 << 2) | 0x20]));
  pm.write(RESET, new Uint8Array([2]));
  pm.write(RESET, new Uint8Array([1]));
  assert.deepEqual(ev, ["off", "reset"]);
});
