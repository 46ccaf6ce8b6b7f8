/**
 * The kernel and initrd as the builder reads them: into an anonymous mapping of their own
 * that is unmapped once the guest's copy is made, not into a V8 buffer. A buffer V8 owns is
 * freed only when a garbage collection finds it dead, and the main thread allocates so little
 * once a guest runs that none may come: a 51 MiB vmlinux and a 6 MiB initrd stayed resident
 * for the whole life of the VM (docs/PERFORMANCE.md, 2026-12-04).
 */

import { ConfigError } from "./config.ts";
import { mmapAnonymous, sysMunmap } from "./sys/libc.ts";

/** A file's bytes in memory of their own, until `release`. */
export interface UserFile {
  /** The bytes (empty for an empty file). Never touched after `release`. */
  readonly bytes: Uint8Array;
  /** Unmaps the bytes; later calls do nothing. */
  release(): void;
}

/**
 * Reads the file at `path` (`what` names it in errors: "kernel", "initrd"); a missing,
 * unreadable or directory path is a ConfigError with one line saying so.
 */
export async function readUserFile(path: string, what: string): Promise<UserFile> {
  const fail = (why: string) => new ConfigError(`Cannot read ${what} "${path}": ${why}`);
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw fail("no such file");
    if (e instanceof Deno.errors.PermissionDenied) throw fail("permission denied");
    throw fail((e as Error).message);
  }
  let ptr: Deno.PointerObject | undefined;
  let size = 0;
  let open = true;
  try {
    const st = await file.stat();
    if (st.isDirectory) throw fail("it is a directory");
    if (!st.isFile) {
      // A pipe or a device (`--initrd <(...)`) has no size to map ahead: read it to its end as
      // a stream (which closes it), into memory V8 frees.
      open = false;
      return { bytes: new Uint8Array(await new Response(file.readable).arrayBuffer()), release() {} };
    }
    size = st.size;
    if (size === 0) return { bytes: new Uint8Array(0), release() {} };
    ptr = mmapAnonymous(size);
    const bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, size));
    let got = 0;
    while (got < size) {
      const n = await file.read(bytes.subarray(got));
      if (n === null || n === 0) break; // it shrank since the stat: what is there
      got += n;
    }
    const mapped = ptr;
    ptr = undefined;
    let released = false;
    return {
      bytes: bytes.subarray(0, got),
      release() {
        if (released) return;
        released = true;
        sysMunmap(mapped, size);
      },
    };
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    throw fail((e as Error).message);
  } finally {
    if (ptr) sysMunmap(ptr, size);
    if (open) file.close();
  }
}
