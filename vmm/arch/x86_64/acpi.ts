/**
 * ACPI tables for a hardware-reduced x86 machine: RSDP, XSDT, FADT, MADT, MCFG and a
 * DSDT written with the AML builder. Layout per ACPI 6.4 chapter 5.
 */

import * as aml from "./aml.ts";
import {
  ACPI_RESET_PORT,
  ACPI_RESET_VALUE,
  ACPI_SLEEP_CONTROL_PORT,
  ACPI_SLEEP_STATUS_PORT,
  COM1_IRQ,
  COM1_PORT,
  ECAM_SIZE,
  ECAM_START,
  I8042_CMD_PORT,
  I8042_DATA_PORT,
  I8042_IRQ,
  IOAPIC_ADDR,
  LAPIC_ADDR,
} from "./layout.ts";
import { S5_SLP_TYP } from "../../../devices/legacy/acpi_pm.ts";

const OEM_ID = "TSVMM ";
const OEM_TABLE_ID = "TSVMMACP";
const CREATOR_ID = "TSVM";
const HEADER_SIZE = 36;

/** A virtio-mmio device to announce in the DSDT. */
export interface MmioDeviceInfo {
  /** Window base. */
  base: number;
  /** Window size. */
  size: number;
  /** GSI (IOAPIC pin). */
  gsi: number;
}

/** The PCI host bridge to describe. */
export interface PciHostInfo {
  /** INTA routing: device number -> GSI, for _PRT. */
  intx: Array<{ slot: number; gsi: number }>;
  /** 32-bit memory window [start, end). */
  mmio32: [number, number];
  /** 64-bit memory window [start, end). */
  mmio64: [number, number];
  /** I/O window [start, end). */
  io: [number, number];
}

/** What the tables describe. */
export interface AcpiConfig {
  /** Number of vCPUs (APIC IDs 0..cpus-1). */
  cpus: number;
  /** virtio-mmio devices, in order. */
  mmioDevices?: MmioDeviceInfo[];
  /** The PCI host bridge (absent: no PCI0 in the DSDT). */
  pci?: PciHostInfo;
}

/** The PCI Firmware spec's _DSM UUID for PCI host bridges. */
export const PCI_DSM_UUID = "E5C937D0-3553-4D7A-9117-EA4D19C3434D";

/**
 * PCI0 (PNP0A08, PCI Express-style host bridge with ECAM; compatible PNP0A03): bus 0,
 * the 0xCF8 ports, I/O and memory windows, INTx routing, and _DSM function 5 = 0 so
 * Linux keeps the BARs the VMM assigned. MRES (PNP0C02) reserves ECAM, which Linux
 * requires before it uses the MCFG window.
 */
export function pciDevices(pci: PciHostInfo): aml.Aml[] {
  const prt = pci.intx.map(({ slot, gsi }) =>
    aml.pkg([aml.int(slot * 0x10000 + 0xffff), aml.int(0), aml.int(0), aml.int(gsi)])
  );
  return [
    aml.device("PCI0", [
      aml.name("_HID", aml.eisaId("PNP0A08")),
      aml.name("_CID", aml.eisaId("PNP0A03")),
      aml.name("_SEG", aml.int(0)),
      aml.name("_UID", aml.int(0)),
      aml.name("_BBN", aml.int(0)),
      aml.name("_ADR", aml.int(0)),
      aml.name(
        "_CRS",
        aml.resourceTemplate([
          aml.wordBusNumber(0, 0),
          aml.ioPort(0xcf8, 8),
          aml.wordIo(0x0000, 0x0cf7),
          aml.wordIo(0x0d00, pci.io[1] - 1),
          aml.dwordMemory(pci.mmio32[0], pci.mmio32[1] - 1),
          aml.qwordMemory(BigInt(pci.mmio64[0]), BigInt(pci.mmio64[1]) - 1n),
        ]),
      ),
      aml.name("_PRT", aml.pkg(prt)),
      aml.method("_DSM", 4, false, [
        aml.ifThen(aml.lEqual(aml.arg(0), aml.uuid(PCI_DSM_UUID)), [
          aml.ifThen(aml.lEqual(aml.arg(2), aml.int(0)), [aml.ret(aml.buffer([0x21]))]),
          aml.ifThen(aml.lEqual(aml.arg(2), aml.int(5)), [aml.ret(aml.int(0))]),
        ]),
        aml.ret(aml.buffer([0])),
      ]),
    ]),
    aml.device("MRES", [
      aml.name("_HID", aml.eisaId("PNP0C02")),
      aml.name("_UID", aml.int(0)),
      aml.name("_CRS", aml.resourceTemplate([aml.memory32Fixed(ECAM_START, ECAM_SIZE)])),
    ]),
  ];
}

/** The 8-bit checksum that makes `bytes` sum to zero. */
export function checksum(bytes: Uint8Array): number {
  let s = 0;
  for (const b of bytes) s = (s + b) & 0xff;
  return (0x100 - s) & 0xff;
}

function ascii(dst: Uint8Array, off: number, s: string): void {
  for (let i = 0; i < s.length; i++) dst[off + i] = s.charCodeAt(i);
}

/** A table: the standard header around `body`, checksummed. */
export function sdt(signature: string, revision: number, body: Uint8Array): Uint8Array {
  const t = new Uint8Array(HEADER_SIZE + body.length);
  const dv = new DataView(t.buffer);
  ascii(t, 0, signature);
  dv.setUint32(4, t.length, true);
  t[8] = revision;
  ascii(t, 10, OEM_ID);
  ascii(t, 16, OEM_TABLE_ID);
  dv.setUint32(24, 1, true);
  ascii(t, 28, CREATOR_ID);
  dv.setUint32(32, 1, true);
  t.set(body, HEADER_SIZE);
  t[9] = checksum(t);
  return t;
}

/** Generic Address Structure for an I/O port of `bits` width. */
function gas(dv: DataView, off: number, port: number, bits: number): void {
  dv.setUint8(off, 1); // SystemIO
  dv.setUint8(off + 1, bits);
  dv.setUint8(off + 2, 0);
  dv.setUint8(off + 3, 1); // byte access
  dv.setBigUint64(off + 4, BigInt(port), true);
}

/** The DSDT: COM1, the i8042, virtio-mmio devices and the S5 sleep object. */
export function buildDsdt(cfg: AcpiConfig): Uint8Array {
  const devices: aml.Aml[] = [
    aml.device("COM1", [
      aml.name("_HID", aml.eisaId("PNP0501")),
      aml.name("_UID", aml.int(1)),
      aml.name("_CRS", aml.resourceTemplate([aml.ioPort(COM1_PORT, 8), aml.irqNoFlags(COM1_IRQ)])),
    ]),
    aml.device("PS2K", [
      aml.name("_HID", aml.eisaId("PNP0303")),
      aml.name(
        "_CRS",
        aml.resourceTemplate([
          aml.ioPort(I8042_DATA_PORT, 1),
          aml.ioPort(I8042_CMD_PORT, 1),
          aml.irqNoFlags(I8042_IRQ),
        ]),
      ),
    ]),
  ];
  (cfg.mmioDevices ?? []).forEach((d, i) => {
    devices.push(aml.device(`VR${i.toString(16).toUpperCase().padStart(2, "0")}`, [
      aml.name("_HID", aml.str("LNRO0005")),
      aml.name("_UID", aml.int(i)),
      aml.name("_CCA", aml.int(1)),
      aml.name(
        "_CRS",
        aml.resourceTemplate([aml.memory32Fixed(d.base, d.size), aml.extendedInterrupt(d.gsi, true)]),
      ),
    ]));
  });
  if (cfg.pci) devices.push(...pciDevices(cfg.pci));
  const body = aml.definitionBlock([
    aml.scope("\\_SB", devices),
    aml.name("\\_S5", aml.pkg([aml.int(S5_SLP_TYP), aml.int(0), aml.int(0), aml.int(0)])),
  ]);
  return sdt("DSDT", 2, body);
}

const FADT_SIZE = 276;
const FADT_HW_REDUCED_ACPI = 1 << 20;
const FADT_RESET_REG_SUP = 1 << 10;
const FADT_PWR_BUTTON = 1 << 4;
const FADT_SLP_BUTTON = 1 << 5;
const IAPC_8042 = 1 << 1;
const IAPC_NO_VGA = 1 << 2;
const IAPC_NO_CMOS_RTC = 1 << 5;

/** FADT (revision 6), hardware-reduced, with sleep and reset registers. */
export function buildFadt(dsdtAddr: number): Uint8Array {
  const body = new Uint8Array(FADT_SIZE - HEADER_SIZE);
  const dv = new DataView(body.buffer);
  const at = (off: number) => off - HEADER_SIZE;
  dv.setUint32(at(40), dsdtAddr, true);
  dv.setUint16(at(109), IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC, true);
  dv.setUint32(at(112), FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_PWR_BUTTON | FADT_SLP_BUTTON, true);
  gas(dv, at(116), ACPI_RESET_PORT, 8);
  dv.setUint8(at(128), ACPI_RESET_VALUE);
  dv.setUint8(at(131), 4); // FADT minor version (6.4)
  dv.setBigUint64(at(140), BigInt(dsdtAddr), true);
  gas(dv, at(244), ACPI_SLEEP_CONTROL_PORT, 8);
  gas(dv, at(256), ACPI_SLEEP_STATUS_PORT, 8);
  ascii(body, at(268), "TSVMMKVM");
  return sdt("FACP", 6, body);
}

/** MADT: one enabled LAPIC per vCPU, the IOAPIC, ISA IRQ0 -> GSI 2, LINT1 as NMI. */
export function buildMadt(cfg: AcpiConfig): Uint8Array {
  const parts: number[] = [];
  const u32 = (v: number) => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24];
  for (let i = 0; i < cfg.cpus; i++) parts.push(0, 8, i, i, ...u32(1));
  parts.push(1, 12, 0, 0, ...u32(IOAPIC_ADDR), ...u32(0));
  parts.push(2, 10, 0, 0, ...u32(2), 0, 0); // ISA IRQ 0 (PIT) is IOAPIC pin 2
  parts.push(4, 6, 0xff, 0, 0, 1); // all processors: LINT1 is NMI
  const body = new Uint8Array(8 + parts.length);
  const dv = new DataView(body.buffer);
  dv.setUint32(0, LAPIC_ADDR, true);
  dv.setUint32(4, 1, true); // PCAT_COMPAT: dual 8259s present
  body.set(parts, 8);
  return sdt("APIC", 5, body);
}

/** MCFG: ECAM for segment 0, bus 0. */
export function buildMcfg(): Uint8Array {
  const body = new Uint8Array(8 + 16);
  const dv = new DataView(body.buffer);
  dv.setBigUint64(8, BigInt(ECAM_START), true);
  dv.setUint16(16, 0, true);
  body[18] = 0;
  body[19] = 0;
  return sdt("MCFG", 1, body);
}

/** XSDT pointing at `tables`. */
export function buildXsdt(tables: number[]): Uint8Array {
  const body = new Uint8Array(tables.length * 8);
  const dv = new DataView(body.buffer);
  tables.forEach((a, i) => dv.setBigUint64(i * 8, BigInt(a), true));
  return sdt("XSDT", 1, body);
}

/** RSDP (revision 2) pointing at the XSDT. */
export function buildRsdp(xsdtAddr: number): Uint8Array {
  const r = new Uint8Array(36);
  const dv = new DataView(r.buffer);
  ascii(r, 0, "RSD PTR ");
  ascii(r, 9, OEM_ID);
  r[15] = 2;
  dv.setUint32(20, 36, true);
  dv.setBigUint64(24, BigInt(xsdtAddr), true);
  r[8] = checksum(r.subarray(0, 20));
  r[32] = checksum(r);
  return r;
}

/** All tables laid out from `start`, with the RSDP at `rsdpAddr`: [address, bytes][]. */
export function buildAcpiTables(
  cfg: AcpiConfig,
  start: number,
  rsdpAddr: number,
): Array<[number, Uint8Array]> {
  const out: Array<[number, Uint8Array]> = [];
  let at = start;
  const place = (t: Uint8Array) => {
    const addr = at;
    out.push([addr, t]);
    at = (at + t.length + 7) & ~7;
    return addr;
  };
  const dsdt = place(buildDsdt(cfg));
  const fadt = place(buildFadt(dsdt));
  const madt = place(buildMadt(cfg));
  const mcfg = place(buildMcfg());
  const xsdt = place(buildXsdt([fadt, madt, mcfg]));
  if (at > rsdpAddr) throw new RangeError("ACPI tables overflow their area");
  out.push([rsdpAddr, buildRsdp(xsdt)]);
  return out;
}
