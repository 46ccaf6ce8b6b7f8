/**
 * struct iovec arrays for readv/writev/preadv/pwritev, filled without allocating: the
 * entries are written as 32-bit halves, and each buffer's address is its ArrayBuffer's
 * host address (taken once per ArrayBuffer, which for guest RAM means once per region)
 * plus its byte offset. Taking a pointer object and BigInts per segment cost about a
 * microsecond each, on every request.
 */

/** Most entries one call takes (Linux's UIO_MAXIOV). */
export const IOV_MAX = 1024;

/** Host address of each ArrayBuffer buffers have lived in (shared by every array here). */
const bases = new WeakMap<ArrayBufferLike, number>();

/** The host address of `b`'s first byte. */
function addressOf(b: Uint8Array): number {
  let base = bases.get(b.buffer);
  if (base === undefined) {
    base = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(b.buffer as ArrayBuffer))));
    bases.set(b.buffer, base);
  }
  return base + b.byteOffset;
}

/** One iovec array, reused from call to call. */
export class Iovecs {
  /** The entries: base lo, base hi, len lo, len hi. */
  readonly words: Uint32Array;
  /** Its address, for the system call. */
  readonly ptr: Deno.PointerValue;
  /** Bytes the last `fill` covered. */
  bytes = 0;

  /** An array of `capacity` entries (at most IOV_MAX). */
  constructor(readonly capacity: number = IOV_MAX) {
    this.words = new Uint32Array(4 * Math.min(capacity, IOV_MAX));
    this.ptr = Deno.UnsafePointer.of(this.words);
  }

  /** Fills entries for `bufs` (as many as fit); returns how many, and sets `bytes`. */
  fill(bufs: readonly Uint8Array[]): number {
    const n = Math.min(bufs.length, this.words.length / 4);
    const w = this.words;
    let bytes = 0;
    for (let i = 0; i < n; i++) {
      const b = bufs[i];
      const addr = addressOf(b);
      w[4 * i] = addr >>> 0;
      w[4 * i + 1] = Math.floor(addr / 2 ** 32);
      w[4 * i + 2] = b.byteLength;
      w[4 * i + 3] = 0;
      bytes += b.byteLength;
    }
    this.bytes = bytes;
    return n;
  }
}
