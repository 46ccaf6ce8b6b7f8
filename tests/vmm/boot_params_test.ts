import assert from "node:assert/strict";
import { BP, buildPvhStartInfo, buildZeroPage, e820Map, PVH_MAGIC } from "../../vmm/boot/params.ts";

const MIB = 1024 * 1024;

Deno.test("e820: 512 MiB guest has low RAM, the reserved BIOS area, high RAM and ECAM", () => {
  assert.deepEqual(e820Map(512 * MIB), [
    { addr: 0x0, size: 0x9fc00, type: 1 },
    { addr: 0x9fc00, size: 0x60400, type: 2 },
    { addr: 0x100000, size: 0x1ff00000, type: 1 },
    { addr: 0xe0000000, size: 0x100000, type: 2 },
  ]);
});

Deno.test("e820: RAM beyond 3 GiB continues at 4 GiB", () => {
  const m = e820Map(4096 * MIB);
  assert.deepEqual(m[2], { addr: 0x100000, size: 0xc0000000 - 0x100000, type: 1 });
  assert.deepEqual(m[4], { addr: 0x1_0000_0000, size: 0x4000_0000, type: 1 });
});

Deno.test("zero page for an ELF kernel: golden fields", () => {
  const zp = buildZeroPage({
    cmdlineAddr: 0x20000,
    initrd: { addr: 0x1fc00000, size: 0x123456 },
    rsdpAddr: 0xe0000,
    e820: e820Map(512 * MIB),
  });
  const dv = new DataView(zp.buffer);
  assert.equal(zp.length, 4096);
  assert.equal(dv.getUint16(0x1fe, true), 0xaa55);
  assert.equal(dv.getUint32(0x202, true), 0x53726448);
  assert.equal(zp[0x210], 0xff, "type_of_loader");
  assert.equal(zp[0x211], 0x81, "loadflags LOADED_HIGH|CAN_USE_HEAP");
  assert.equal(dv.getUint16(0x224, true), 0xfe00, "heap_end_ptr");
  assert.equal(dv.getUint32(0x228, true), 0x20000, "cmd_line_ptr");
  assert.equal(dv.getUint32(0x218, true), 0x1fc00000, "ramdisk_image");
  assert.equal(dv.getUint32(0x21c, true), 0x123456, "ramdisk_size");
  assert.equal(dv.getUint32(0x230, true), 0x1000000, "kernel_alignment");
  assert.equal(dv.getBigUint64(0x070, true), 0xe0000n, "acpi_rsdp_addr");
  assert.equal(zp[BP.e820Entries], 4);
  const entry = (i: number) => [
    dv.getBigUint64(0x2d0 + i * 20, true),
    dv.getBigUint64(0x2d8 + i * 20, true),
    dv.getUint32(0x2e0 + i * 20, true),
  ];
  assert.deepEqual(entry(0), [0n, 0x9fc00n, 1]);
  assert.deepEqual(entry(1), [0x9fc00n, 0x60400n, 2]);
  assert.deepEqual(entry(2), [0x100000n, 0x1ff00000n, 1]);
  assert.deepEqual(entry(3), [0xe0000000n, 0x100000n, 2]);
  assert.deepEqual(entry(4), [0n, 0n, 0]);
});

Deno.test("zero page for a bzImage copies its setup header and keeps its flags", () => {
  const hdr = new Uint8Array(0x202 + 0x66 - 0x1f1);
  hdr[0x211 - 0x1f1] = 0x01; // the kernel's own LOADED_HIGH
  hdr[0x1f1 - 0x1f1] = 27; // setup_sects
  new DataView(hdr.buffer).setUint16(0x206 - 0x1f1, 0x20f, true);
  const zp = buildZeroPage({
    setupHeader: hdr,
    cmdlineAddr: 0x20000,
    rsdpAddr: 0xe0000,
    e820: e820Map(64 * MIB),
  });
  const dv = new DataView(zp.buffer);
  assert.equal(zp[0x1f1], 27);
  assert.equal(dv.getUint16(0x206, true), 0x20f);
  assert.equal(zp[0x211], 0x81);
  assert.equal(dv.getUint32(0x218, true), 0, "no initrd");
});

Deno.test("PVH start_info: magic, version, cmdline, RSDP, module and memory map", () => {
  const b = buildPvhStartInfo(0x6000, {
    cmdlineAddr: 0x20000,
    rsdpAddr: 0xe0000,
    e820: e820Map(256 * MIB),
    initrd: { addr: 0xf000000, size: 4096 },
  });
  const dv = new DataView(b.buffer);
  assert.equal(dv.getUint32(0, true), PVH_MAGIC);
  assert.equal(dv.getUint32(4, true), 1);
  assert.equal(dv.getUint32(12, true), 1, "nr_modules");
  assert.equal(dv.getBigUint64(16, true), 0x6040n, "modlist_paddr");
  assert.equal(dv.getBigUint64(24, true), 0x20000n);
  assert.equal(dv.getBigUint64(32, true), 0xe0000n);
  assert.equal(dv.getBigUint64(40, true), 0x6080n, "memmap_paddr");
  assert.equal(dv.getUint32(48, true), 4);
  assert.equal(dv.getBigUint64(0x40, true), 0xf000000n);
  assert.equal(dv.getBigUint64(0x48, true), 4096n);
  assert.equal(dv.getBigUint64(0x80 + 2 * 24 + 8, true), BigInt(256 * MIB - 0x100000));
});
