/**
 * The kernel and initrd are read into memory the builder gives back once the guest has its
 * copy (vmm/user_file.ts), not into a buffer left to V8's garbage collector, which kept a
 * 51 MiB vmlinux resident for a VM's whole life.
 */

import assert from "node:assert/strict";
import { readUserFile } from "../../vmm/user_file.ts";
import { ConfigError } from "../../vmm/config.ts";

/** The /proc/self/maps line whose range holds `addr`, if any. */
function mappingAt(addr: bigint): string | undefined {
  return Deno.readTextFileSync("/proc/self/maps").split("\n").find((l) => {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(l);
    return m !== null && BigInt(`0x${m[1]}`) <= addr && addr < BigInt(`0x${m[2]}`);
  });
}

Deno.test("user file: read whole into a mapping of its own, which release unmaps", async () => {
  const path = await Deno.makeTempFile();
  const content = new Uint8Array(3 * 1024 * 1024 + 123).map((_, i) => (i * 31 + 7) & 0xff);
  try {
    await Deno.writeFile(path, content);
    const f = await readUserFile(path, "kernel");
    assert.deepEqual(f.bytes, content);
    const addr = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(f.bytes)));
    const line = mappingAt(addr);
    assert.ok(line, "the bytes are in a mapping");
    const [lo, hi] = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line)!.slice(1).map((x) => BigInt(`0x${x}`));
    assert.ok(hi - lo >= BigInt(content.length), `a mapping of the file's size at least: ${line}`);
    assert.match(line, /^\S+ rw-p 00000000 00:00 0\s*$/, "anonymous");
    f.release();
    assert.equal(mappingAt(addr), undefined, "unmapped after release");
    f.release(); // a second release does nothing
  } finally {
    await Deno.remove(path);
  }
});

Deno.test("user file: an empty file, a missing one, a directory", async () => {
  const path = await Deno.makeTempFile();
  const dir = await Deno.makeTempDir();
  try {
    const f = await readUserFile(path, "initrd");
    assert.equal(f.bytes.length, 0);
    f.release();
    await assert.rejects(
      readUserFile(`${dir}/none`, "kernel"),
      (e) => e instanceof ConfigError && /^Cannot read kernel ".*\/none": no such file$/.test(e.message),
    );
    await assert.rejects(
      readUserFile(dir, "initrd"),
      (e) => e instanceof ConfigError && /^Cannot read initrd ".*": it is a directory$/.test(e.message),
    );
  } finally {
    await Deno.remove(path);
    await Deno.remove(dir);
  }
});

Deno.test("user file: a pipe (as `--initrd <(...)` gives one) is read to its end", async () => {
  const dir = await Deno.makeTempDir();
  const fifo = `${dir}/fifo`;
  const content = new Uint8Array(300_000).map((_, i) => (i * 13 + 5) & 0xff);
  try {
    const made = await new Deno.Command("mkfifo", { args: [fifo] }).output();
    assert.ok(made.success, "mkfifo");
    const writer = (async () => {
      const w = await Deno.open(fifo, { write: true });
      await w.write(content).then(async (n) => {
        for (let at = n; at < content.length;) at += await w.write(content.subarray(at));
      });
      w.close();
    })();
    const f = await readUserFile(fifo, "initrd");
    await writer;
    assert.deepEqual(f.bytes, content);
    f.release();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
