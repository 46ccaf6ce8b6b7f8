/**
 * Extracts the uncompressed vmlinux ELF from a bzImage's payload (payload_offset /
 * payload_length in the setup header). Debian's 6.1 cloud kernel uses LZ4 (legacy
 * frame), 6.12 uses zstd; gzip is handled too.
 */

import { zstdDecompressSync } from "node:zlib";
import { type BzImage, NotAKernelError } from "./kernel_image.ts";

const LZ4_LEGACY_MAGIC = 0x184c2102;
const LZ4_LEGACY_BLOCK = 8 << 20;

/** Decodes one LZ4 block into `out` at `pos`; returns the new position. */
function lz4Block(src: Uint8Array, out: Uint8Array, pos: number): number {
  let i = 0;
  const fail = () => {
    throw new NotAKernelError("corrupt LZ4 data in the kernel payload");
  };
  while (i < src.length) {
    const token = src[i++];
    let lit = token >> 4;
    if (lit === 15) {
      let b;
      do {
        if (i >= src.length) fail();
        b = src[i++];
        lit += b;
      } while (b === 255);
    }
    if (i + lit > src.length || pos + lit > out.length) fail();
    out.set(src.subarray(i, i + lit), pos);
    i += lit;
    pos += lit;
    if (i >= src.length) break; // last sequence: literals only
    if (i + 2 > src.length) fail();
    const offset = src[i] | (src[i + 1] << 8);
    i += 2;
    if (offset === 0 || offset > pos) fail();
    let len = (token & 15) + 4;
    if ((token & 15) === 15) {
      let b;
      do {
        if (i >= src.length) fail();
        b = src[i++];
        len += b;
      } while (b === 255);
    }
    if (pos + len > out.length) fail();
    let from = pos - offset;
    if (offset >= len) {
      out.copyWithin(pos, from, from + len);
      pos += len;
    } else {
      for (let k = 0; k < len; k++) out[pos++] = out[from++];
    }
  }
  return pos;
}

/** Decompresses LZ4's legacy frame format (lz4 -l), as the kernel build writes it. */
export function lz4LegacyDecompress(data: Uint8Array, sizeHint: number): Uint8Array {
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let out = new Uint8Array(Math.max(sizeHint, LZ4_LEGACY_BLOCK));
  let pos = 0;
  let i = 0;
  while (i + 4 <= data.length) {
    const v = dv.getUint32(i, true);
    if (v === LZ4_LEGACY_MAGIC) {
      i += 4;
      continue;
    }
    // A block size larger than what is left is the kernel's appended length word.
    if (v === 0 || i + 4 + v > data.length) break;
    if (out.length - pos < LZ4_LEGACY_BLOCK) {
      const bigger = new Uint8Array(out.length * 2);
      bigger.set(out.subarray(0, pos));
      out = bigger;
    }
    pos = lz4Block(data.subarray(i + 4, i + 4 + v), out, pos);
    i += 4 + v;
  }
  return out.slice(0, pos);
}

async function gunzip(data: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([data as Uint8Array<ArrayBuffer>]).stream().pipeThrough(
    new DecompressionStream("gzip"),
  );
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Returns the vmlinux ELF inside a bzImage. */
export async function unpackBzImage(k: BzImage, name: string): Promise<Uint8Array> {
  const z = k.compressed;
  if (z.length < 8) throw new NotAKernelError(`"${name}" has no compressed payload to unpack`);
  // The kernel build appends the uncompressed size as a 32-bit little-endian word.
  const sizeHint = new DataView(z.buffer, z.byteOffset + z.length - 4, 4).getUint32(0, true);
  let elf: Uint8Array;
  if (z[0] === 0x02 && z[1] === 0x21 && z[2] === 0x4c && z[3] === 0x18) {
    elf = lz4LegacyDecompress(z, sizeHint);
  } else if (z[0] === 0x28 && z[1] === 0xb5 && z[2] === 0x2f && z[3] === 0xfd) {
    elf = new Uint8Array(zstdDecompressSync(z.subarray(0, z.length - 4)));
  } else if (z[0] === 0x1f && z[1] === 0x8b) {
    elf = await gunzip(z);
  } else {
    const magic = Array.from(z.subarray(0, 4), (b) => b.toString(16).padStart(2, "0")).join(" ");
    throw new NotAKernelError(`"${name}" is compressed with an unsupported format (magic ${magic})`);
  }
  if (elf[0] !== 0x7f || elf[1] !== 0x45) {
    throw new NotAKernelError(`"${name}": the unpacked payload is not an ELF file`);
  }
  return elf;
}
