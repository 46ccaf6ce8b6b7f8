/**
 * Kernel image parsing: the bzImage setup header (Documentation/arch/x86/boot.rst)
 * and ELF64 vmlinux program headers with the Xen PVH entry note. Parsing only;
 * every offset read from the file is checked against its length.
 */

/** A bzImage, parsed. */
export interface BzImage {
  /** Discriminant. */
  kind: "bzimage";
  /** Boot protocol version, e.g. 0x20f. */
  version: number;
  /** The setup header bytes, [0x1f1, end of header). */
  header: Uint8Array;
  /** The protected-mode kernel (loaded at 1 MiB). */
  payload: Uint8Array;
  /** Largest command line the kernel accepts, excluding the NUL. */
  cmdlineSize: number;
  /** Highest address an initrd may end at (inclusive). */
  initrdAddrMax: number;
  /** Memory the kernel needs from its load address while booting. */
  initSize: number;
  /** Offset and length of the compressed vmlinux inside `payload`. */
  compressed: Uint8Array;
}

/** A PT_LOAD segment. */
export interface ElfSegment {
  /** Physical load address. */
  paddr: number;
  /** Bytes from the file. */
  data: Uint8Array;
  /** Size in memory (>= data.length; the rest is zeroed). */
  memsz: number;
}

/** A vmlinux ELF, parsed. */
export interface ElfKernel {
  /** Discriminant. */
  kind: "elf";
  /** e_entry (physical for x86 vmlinux: startup_64). */
  entry: number;
  /** The 32-bit PVH entry (XEN_ELFNOTE_PHYS32_ENTRY), if the note is there. */
  pvhEntry?: number;
  /** Loadable segments. */
  segments: ElfSegment[];
}

/** Either kind of kernel. */
export type KernelImage = BzImage | ElfKernel;

/** The kernel file is not something we can boot. */
export class NotAKernelError extends Error {
  /** Builds the error for `what`. */
  constructor(what: string) {
    super(what);
    this.name = "NotAKernelError";
  }
}

const XLF_KERNEL_64 = 1;
const XEN_ELFNOTE_PHYS32_ENTRY = 18;
const PT_LOAD = 1;
const PT_NOTE = 4;
/** COMMAND_LINE_SIZE on x86 (used when the image does not say). */
export const X86_COMMAND_LINE_SIZE = 2048;

/** Parses a bzImage or an ELF vmlinux; throws NotAKernelError otherwise. */
export function parseKernel(file: Uint8Array, name: string): KernelImage {
  if (file.length >= 64 && file[0] === 0x7f && file[1] === 0x45 && file[2] === 0x4c && file[3] === 0x46) {
    return parseElf(file, name);
  }
  if (file.length >= 0x264 && new TextDecoder().decode(file.subarray(0x202, 0x206)) === "HdrS") {
    return parseBzImage(file, name);
  }
  throw new NotAKernelError(`"${name}" is not a Linux kernel (neither a bzImage nor an ELF vmlinux)`);
}

function parseBzImage(file: Uint8Array, name: string): BzImage {
  const dv = new DataView(file.buffer, file.byteOffset, file.byteLength);
  const version = dv.getUint16(0x206, true);
  if (version < 0x20c) {
    throw new NotAKernelError(
      `"${name}" uses boot protocol ${version >> 8}.${version & 0xff}; 2.12 or later is required`,
    );
  }
  const xloadflags = dv.getUint16(0x236, true);
  if (!(xloadflags & XLF_KERNEL_64)) {
    throw new NotAKernelError(`"${name}" has no 64-bit entry point (XLF_KERNEL_64 is clear)`);
  }
  let setupSects = file[0x1f1];
  if (setupSects === 0) setupSects = 4;
  const payloadStart = (setupSects + 1) * 512;
  const headerEnd = 0x202 + file[0x201];
  if (payloadStart >= file.length || headerEnd > payloadStart) {
    throw new NotAKernelError(`"${name}" is truncated: setup is larger than the file`);
  }
  const payload = file.subarray(payloadStart);
  const zOff = dv.getUint32(0x248, true);
  const zLen = dv.getUint32(0x24c, true);
  const compressed = zOff + zLen <= payload.length ? payload.subarray(zOff, zOff + zLen) : new Uint8Array(0);
  return {
    kind: "bzimage",
    version,
    header: file.slice(0x1f1, headerEnd),
    payload,
    cmdlineSize: dv.getUint32(0x238, true),
    initrdAddrMax: dv.getUint32(0x22c, true),
    initSize: dv.getUint32(0x260, true),
    compressed,
  };
}

function parseElf(file: Uint8Array, name: string): ElfKernel {
  const dv = new DataView(file.buffer, file.byteOffset, file.byteLength);
  const bad = (why: string) => new NotAKernelError(`"${name}" is not a bootable x86-64 ELF kernel: ${why}`);
  if (file[4] !== 2 || file[5] !== 1) throw bad("not a little-endian ELF64 file");
  if (dv.getUint16(0x12, true) !== 0x3e) throw bad("not built for x86-64");
  const entry = Number(dv.getBigUint64(0x18, true));
  const phoff = Number(dv.getBigUint64(0x20, true));
  const phentsize = dv.getUint16(0x36, true);
  const phnum = dv.getUint16(0x38, true);
  if (phentsize < 56 || phnum === 0 || phoff + phnum * phentsize > file.length) {
    throw bad("program headers are missing or outside the file");
  }
  const segments: ElfSegment[] = [];
  let pvhEntry: number | undefined;
  for (let i = 0; i < phnum; i++) {
    const o = phoff + i * phentsize;
    const type = dv.getUint32(o, true);
    const offset = Number(dv.getBigUint64(o + 8, true));
    const paddr = Number(dv.getBigUint64(o + 24, true));
    const filesz = Number(dv.getBigUint64(o + 32, true));
    const memsz = Number(dv.getBigUint64(o + 40, true));
    if (type !== PT_LOAD && type !== PT_NOTE) continue;
    if (!Number.isSafeInteger(offset + filesz) || offset + filesz > file.length) {
      throw bad(`segment ${i} lies outside the file`);
    }
    if (type === PT_LOAD) {
      if (memsz < filesz || !Number.isSafeInteger(paddr + memsz)) throw bad(`segment ${i} has bad sizes`);
      segments.push({ paddr, data: file.subarray(offset, offset + filesz), memsz });
    } else {
      pvhEntry ??= findPvhNote(file.subarray(offset, offset + filesz));
    }
  }
  if (segments.length === 0) throw bad("no loadable segments");
  if (!segments.some((s) => entry >= s.paddr && entry < s.paddr + s.memsz)) {
    throw bad(`entry point 0x${entry.toString(16)} is not inside a loaded segment`);
  }
  return { kind: "elf", entry, pvhEntry, segments };
}

/** Walks ELF notes for Xen's PHYS32_ENTRY. */
function findPvhNote(notes: Uint8Array): number | undefined {
  const dv = new DataView(notes.buffer, notes.byteOffset, notes.byteLength);
  const align4 = (n: number) => (n + 3) & ~3;
  let o = 0;
  while (o + 12 <= notes.length) {
    const namesz = dv.getUint32(o, true);
    const descsz = dv.getUint32(o + 4, true);
    const type = dv.getUint32(o + 8, true);
    const nameOff = o + 12;
    const descOff = nameOff + align4(namesz);
    if (descOff + descsz > notes.length) return undefined;
    const noteName = new TextDecoder().decode(notes.subarray(nameOff, nameOff + namesz)).replace(/\0+$/, "");
    if (noteName === "Xen" && type === XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4) {
      return dv.getUint32(descOff, true);
    }
    o = descOff + align4(descsz);
  }
  return undefined;
}

/** The lowest and highest physical addresses the kernel occupies once loaded. */
export function kernelExtent(k: KernelImage, loadAddr: number): { start: number; end: number } {
  if (k.kind === "bzimage") {
    return { start: loadAddr, end: loadAddr + Math.max(k.initSize, k.payload.length) };
  }
  let start = Infinity, end = 0;
  for (const s of k.segments) {
    start = Math.min(start, s.paddr);
    end = Math.max(end, s.paddr + s.memsz);
  }
  return { start, end };
}
