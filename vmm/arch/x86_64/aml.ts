/**
 * A small AML (ACPI Machine Language) builder: the terms a VMM's DSDT needs, each a
 * function returning its encoded bytes (ACPI 6.4 chapter 20, "ACPI Machine Language
 * Specification"; resource descriptors from chapter 6.4).
 */

/** Encoded AML. */
export type Aml = number[];

function concat(parts: Aml[]): Aml {
  return parts.flat();
}

/** PkgLength: encodes `len` bytes of content plus the PkgLength itself (20.2.4). */
export function pkgLength(len: number): Aml {
  if (len + 1 < 0x40) return [len + 1];
  for (let n = 1; n <= 3; n++) {
    const total = len + n + 1;
    if (total < 1 << (4 + 8 * n)) {
      const out = [(n << 6) | (total & 0x0f)];
      for (let i = 0; i < n; i++) out.push((total >> (4 + 8 * i)) & 0xff);
      return out;
    }
  }
  throw new RangeError("AML package too large");
}

function nameSeg(seg: string): Aml {
  if (!/^[A-Z_][A-Z0-9_]{0,3}$/.test(seg)) throw new TypeError(`bad AML name segment "${seg}"`);
  return Array.from(seg.padEnd(4, "_"), (c) => c.charCodeAt(0));
}

/** NameString: `\`-rooted or relative, `.`-separated 1-4 char segments. */
export function nameString(path: string): Aml {
  const out: Aml = [];
  let p = path;
  if (p.startsWith("\\")) {
    out.push(0x5c);
    p = p.slice(1);
  }
  while (p.startsWith("^")) {
    out.push(0x5e);
    p = p.slice(1);
  }
  const segs = p === "" ? [] : p.split(".");
  if (segs.length === 0) out.push(0x00);
  else if (segs.length === 2) out.push(0x2e);
  else if (segs.length > 2) out.push(0x2f, segs.length);
  for (const s of segs) out.push(...nameSeg(s));
  return out;
}

/** An integer with the shortest encoding. */
export function int(v: number | bigint): Aml {
  const n = BigInt(v);
  if (n === 0n) return [0x00];
  if (n === 1n) return [0x01];
  const le = (bytes: number) => Array.from({ length: bytes }, (_, i) => Number((n >> BigInt(8 * i)) & 0xffn));
  if (n <= 0xffn) return [0x0a, ...le(1)];
  if (n <= 0xffffn) return [0x0b, ...le(2)];
  if (n <= 0xffffffffn) return [0x0c, ...le(4)];
  return [0x0e, ...le(8)];
}

/** A string constant. */
export function str(s: string): Aml {
  return [0x0d, ...Array.from(s, (c) => c.charCodeAt(0) & 0x7f), 0x00];
}

/** EISAID("PNP0501") as its compressed 32-bit form. */
export function eisaId(id: string): Aml {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) throw new TypeError(`bad EISA id "${id}"`);
  const c = (i: number) => id.charCodeAt(i) - 0x40;
  const hex = parseInt(id.slice(3), 16);
  const v = ((c(0) << 26) | (c(1) << 21) | (c(2) << 16) | hex) >>> 0;
  // Stored byte-swapped: the vendor letters first.
  const swapped = (((v >>> 24) & 0xff) | (((v >>> 16) & 0xff) << 8) | (((v >>> 8) & 0xff) << 16) |
    ((v & 0xff) << 24)) >>> 0;
  return [0x0c, swapped & 0xff, (swapped >>> 8) & 0xff, (swapped >>> 16) & 0xff, swapped >>> 24];
}

/** Name(path, value). */
export function name(path: string, value: Aml): Aml {
  return [0x08, ...nameString(path), ...value];
}

/** Scope(path) { children }. */
export function scope(path: string, children: Aml[]): Aml {
  const body = [...nameString(path), ...concat(children)];
  return [0x10, ...pkgLength(body.length), ...body];
}

/** Device(path) { children }. */
export function device(path: string, children: Aml[]): Aml {
  const body = [...nameString(path), ...concat(children)];
  return [0x5b, 0x82, ...pkgLength(body.length), ...body];
}

/** Method(path, argCount, serialized) { body }. */
export function method(path: string, args: number, serialized: boolean, body: Aml[]): Aml {
  const b = [...nameString(path), (args & 7) | (serialized ? 8 : 0), ...concat(body)];
  return [0x14, ...pkgLength(b.length), ...b];
}

/** Return(value). */
export function ret(value: Aml): Aml {
  return [0xa4, ...value];
}

/** Package() { elements }. */
export function pkg(elements: Aml[]): Aml {
  const body = [elements.length, ...concat(elements)];
  return [0x12, ...pkgLength(body.length), ...body];
}

/** Buffer() { bytes }. */
export function buffer(bytes: Aml): Aml {
  const body = [...int(bytes.length), ...bytes];
  return [0x11, ...pkgLength(body.length), ...body];
}

/** ResourceTemplate() { descriptors }, with its end tag. */
export function resourceTemplate(descriptors: Aml[]): Aml {
  return buffer([...concat(descriptors), 0x79, 0x00]);
}

/** IO(Decode16, min, max = min, align 1, len). */
export function ioPort(base: number, len: number): Aml {
  return [0x47, 0x01, base & 0xff, base >> 8, base & 0xff, base >> 8, 0x01, len];
}

/** IRQNoFlags() { irq } (edge, active high, exclusive). */
export function irqNoFlags(irq: number): Aml {
  const mask = 1 << irq;
  return [0x22, mask & 0xff, mask >> 8];
}

/** Memory32Fixed(ReadWrite, base, len). */
export function memory32Fixed(base: number, len: number): Aml {
  const out = [0x86, 0x09, 0x00, 0x01];
  for (const v of [base, len]) out.push(v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24);
  return out;
}

/** Interrupt(ResourceConsumer, edge|level, ActiveHigh, Exclusive) { gsi }. */
export function extendedInterrupt(gsi: number, level: boolean): Aml {
  const flags = 0x01 | (level ? 0 : 0x02); // consumer; edge-triggered when not level
  return [0x89, 0x06, 0x00, flags, 0x01, gsi & 0xff, (gsi >>> 8) & 0xff, (gsi >>> 16) & 0xff, gsi >>> 24];
}

/** An address-space descriptor (WordBusNumber, WordIO, DWordMemory, QWordMemory). */
function addressSpace(
  tag: number,
  width: 2 | 4 | 8,
  resourceType: number,
  typeFlags: number,
  min: bigint,
  max: bigint,
): Aml {
  const le = (v: bigint) => Array.from({ length: width }, (_, i) => Number((v >> BigInt(8 * i)) & 0xffn));
  const body = [
    resourceType,
    0x0c, // generalFlags: min and max fixed, producer, positive decode
    typeFlags,
    ...le(0n), // granularity
    ...le(min),
    ...le(max),
    ...le(0n), // translation
    ...le(max - min + 1n),
  ];
  return [tag, body.length & 0xff, body.length >> 8, ...body];
}

/** WordBusNumber(ResourceProducer, ...) { min..max }. */
export function wordBusNumber(min: number, max: number): Aml {
  return addressSpace(0x88, 2, 2, 0, BigInt(min), BigInt(max));
}

/** WordIO(ResourceProducer, ..., EntireRange) { min..max }. */
export function wordIo(min: number, max: number): Aml {
  return addressSpace(0x88, 2, 1, 3, BigInt(min), BigInt(max));
}

/** DWordMemory(ResourceProducer, ..., NonCacheable, ReadWrite) { min..max }. */
export function dwordMemory(min: number, max: number): Aml {
  return addressSpace(0x87, 4, 0, 0x01, BigInt(min), BigInt(max));
}

/** QWordMemory(ResourceProducer, ..., Cacheable, ReadWrite) { min..max }. */
export function qwordMemory(min: bigint, max: bigint): Aml {
  return addressSpace(0x8a, 8, 0, 0x03, min, max);
}

/** If (predicate) { body }. */
export function ifThen(predicate: Aml, body: Aml[]): Aml {
  const b = [...predicate, ...concat(body)];
  return [0xa0, ...pkgLength(b.length), ...b];
}

/** LEqual(a, b). */
export function lEqual(a: Aml, b: Aml): Aml {
  return [0x93, ...a, ...b];
}

/** ArgN (0-6), a method argument. */
export function arg(n: number): Aml {
  if (n < 0 || n > 6) throw new RangeError(`Arg${n}`);
  return [0x68 + n];
}

/** ToUUID("xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx") as its 16-byte buffer (first three fields little-endian). */
export function uuid(text: string): Aml {
  const m = /^([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})$/i.exec(text);
  if (!m) throw new TypeError(`bad UUID "${text}"`);
  const hex = (h: string) => h.match(/../g)!.map((x) => parseInt(x, 16));
  return buffer([
    ...hex(m[1]).reverse(),
    ...hex(m[2]).reverse(),
    ...hex(m[3]).reverse(),
    ...hex(m[4]),
    ...hex(m[5]),
  ]);
}

/** A complete AML table body: the DSDT's definition block contents. */
export function definitionBlock(terms: Aml[]): Uint8Array {
  return new Uint8Array(concat(terms));
}
