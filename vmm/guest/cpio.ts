/**
 * A cpio "newc" (SVR4, no CRC) archive writer, the format the kernel unpacks as an
 * initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
 * Deterministic: entries in the order given, mtime 0, uid/gid 0, inodes numbered from 1.
 */

/** One archive entry. */
export type CpioEntry =
  | { type: "dir"; path: string; mode?: number }
  | { type: "file"; path: string; data: Uint8Array; mode?: number }
  | { type: "symlink"; path: string; target: string };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;

function hex8(n: number): string {
  return n.toString(16).padStart(8, "0");
}

/** Writes the entries and the TRAILER!!! record. */
export function writeCpio(entries: CpioEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const chunks: Uint8Array[] = [];
  let size = 0;
  const push = (b: Uint8Array) => {
    chunks.push(b);
    size += b.length;
  };
  const pad4 = () => {
    const p = (4 - (size % 4)) % 4;
    if (p) push(new Uint8Array(p));
  };
  const record = (ino: number, mode: number, nlink: number, name: string, data: Uint8Array) => {
    const nameBytes = enc.encode(name + "\0");
    const header = "070701" + hex8(ino) + hex8(mode) + hex8(0) + hex8(0) + hex8(nlink) + hex8(0) +
      hex8(data.length) + hex8(0) + hex8(0) + hex8(0) + hex8(0) + hex8(nameBytes.length) + hex8(0);
    push(enc.encode(header));
    push(nameBytes);
    pad4();
    push(data);
    pad4();
  };
  let ino = 1;
  for (const e of entries) {
    const path = e.path.replace(/^\/+/, "");
    if (!path || path.split("/").some((p) => p === ".." || p === "")) {
      throw new TypeError(`bad cpio path "${e.path}"`);
    }
    if (e.type === "dir") record(ino++, S_IFDIR | (e.mode ?? 0o755), 2, path, new Uint8Array(0));
    else if (e.type === "file") record(ino++, S_IFREG | (e.mode ?? 0o644), 1, path, e.data);
    else record(ino++, S_IFLNK | 0o777, 1, path, enc.encode(e.target));
  }
  record(0, 0, 1, "TRAILER!!!", new Uint8Array(0));
  const out = new Uint8Array(size);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

/** Collects archive entries, adding parent directories once and skipping repeated paths. */
export class CpioTree {
  /** Entries in the order they were added. */
  readonly entries: CpioEntry[] = [];
  private readonly seen = new Set<string>();

  private parents(path: string): void {
    const parts = path.split("/");
    for (let i = 1; i < parts.length; i++) {
      const d = parts.slice(0, i).join("/");
      if (!this.seen.has(d)) {
        this.seen.add(d);
        this.entries.push({ type: "dir", path: d });
      }
    }
  }

  /** Adds a directory. */
  dir(path: string): void {
    this.parents(`${path}/x`);
  }

  /** Adds a file (a path already present is kept as it was). */
  file(path: string, data: Uint8Array, mode = 0o644): void {
    if (this.seen.has(path)) return;
    this.parents(path);
    this.seen.add(path);
    this.entries.push({ type: "file", path, data, mode });
  }

  /** Adds a symbolic link. */
  symlink(path: string, target: string): void {
    if (this.seen.has(path)) return;
    this.parents(path);
    this.seen.add(path);
    this.entries.push({ type: "symlink", path, target });
  }

  /** The archive. */
  bytes(): Uint8Array {
    return writeCpio(this.entries);
  }
}
