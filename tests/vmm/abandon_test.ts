/**
 * Teardown after a device thread died: guest RAM and the images' fd numbers are given up in
 * a way that a transfer the dead thread left running cannot reach anything else (builder.ts
 * release). No KVM needed: the transfers here are real calls on Deno's blocking pool that
 * wait on a pipe, as a dead thread's could wait on a slow disk.
 */

import assert from "node:assert/strict";
import { mmapAnonymous, reserveInPlace, sysClose, sysMunmap } from "../../vmm/sys/libc.ts";
import { FileBackend } from "../../vmm/block_file.ts";
import { DeviceThread } from "../../vmm/device_thread.ts";

const PAGE = 4096;
const MAP_FIXED_NOREPLACE = 0x100000;

const c = Deno.dlopen("libc.so.6", {
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  // A read into an address, on Deno's blocking pool: what a dead thread's transfer is.
  read_nb: { name: "read", parameters: ["i32", "pointer", "usize"], result: "isize", nonblocking: true },
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
});

function pipe(): [number, number] {
  const fds = new Int32Array(2);
  assert.equal(c.symbols.pipe2(new Uint8Array(fds.buffer), 0o2000000), 0);
  return [fds[0], fds[1]];
}

/** Maps a fresh page exactly at `p` if nothing is there; null if something is. */
function mapAt(p: Deno.PointerObject): Deno.PointerObject | null {
  const r = c.symbols.mmap(p, BigInt(PAGE), 3, 0x22 | MAP_FIXED_NOREPLACE, -1, 0n);
  if (r === null || Deno.UnsafePointer.value(r) === -1n) return null;
  if (Deno.UnsafePointer.value(r) !== Deno.UnsafePointer.value(p)) {
    c.symbols.munmap(r, BigInt(PAGE)); // an old kernel took the flag as a hint
    return null;
  }
  return r;
}

Deno.test("abandoned RAM: a read still in flight into it fails, and no later mapping there receives its data", async () => {
  const size = 4 << 20;
  const ram = mmapAnonymous(size);
  new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ram, size)).fill(1);
  const [r, w] = pipe();
  // Waits on the pool until the pipe has data, as a transfer of a dead device thread would.
  const inFlight = c.symbols.read_nb(r, ram, BigInt(PAGE));
  await new Promise((res) => setTimeout(res, 50));
  assert.ok(reserveInPlace(ram, size));
  // Nothing can be mapped over those addresses any more.
  const later = mapAt(ram);
  const data = new Uint8Array(PAGE).fill(0xa5);
  assert.equal(c.symbols.write(w, data, BigInt(PAGE)), BigInt(PAGE));
  const got = Number(await inFlight);
  let landed = false;
  if (later) {
    landed = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(later, PAGE))[0] === 0xa5;
    c.symbols.munmap(later, BigInt(PAGE));
  }
  sysClose(r);
  sysClose(w);
  assert.equal(later, null, "a new mapping took the abandoned addresses");
  assert.equal(landed, false);
  assert.equal(got, -1, "the late read must fail (EFAULT), not copy into the addresses");
  // The reservation has no memory behind it: nothing of guest RAM is kept.
  const maps = Deno.readTextFileSync("/proc/self/smaps");
  const at = Deno.UnsafePointer.value(ram).toString(16);
  const entry = maps.split(/\n(?=[0-9a-f]+-)/).find((m) => m.startsWith(at));
  assert.ok(entry, "the reservation is in /proc/self/smaps");
  assert.match(entry!, /^[0-9a-f]+-[0-9a-f]+ ---p /);
  assert.match(entry!, /\nRss:\s+0 kB/);
  sysMunmap(ram, size);
});

Deno.test("abandoned image: its fd number is kept on /dev/null, the lock goes, and a late write changes nothing", async () => {
  const path = await Deno.makeTempFile();
  await Deno.writeFile(path, new Uint8Array(8192).fill(7));
  const b = FileBackend.open(path, false);
  const fd = b.share().fd;
  await b.close(true);
  assert.equal(Deno.readLinkSync(`/proc/self/fd/${fd}`), "/dev/null");
  // A late write through the old number, as a dead thread's could come.
  c.symbols.pwrite(fd, new Uint8Array(512).fill(9), 512n, 0n);
  assert.deepEqual(await Deno.readFile(path), new Uint8Array(8192).fill(7));
  // The image's lock went with it: it opens again.
  const again = FileBackend.open(path, false);
  assert.notEqual(again.share().fd, fd);
  await again.close();
  sysClose(fd);
  await Deno.remove(path);
});

Deno.test("device thread: a worker that dies says so (died), and what waited on it is answered", async () => {
  const errors: string[] = [];
  // No memory at address 0: the worker's first step throws where nothing catches it.
  const t = new DeviceThread({ base: 0n, size: PAGE, regions: [] }, 0, 0);
  t.onError = (m) => errors.push(m);
  assert.equal(t.died, false);
  const answer = t.request({ op: "describe" });
  // Starting the Worker (its module loaded and checked) can take seconds on a loaded host.
  for (let i = 0; i < 6000 && !t.died; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(t.died, true);
  assert.equal(await answer, undefined);
  assert.equal(errors.length, 1);
  await t.stop();
});
