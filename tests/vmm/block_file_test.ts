/**
 * The file backend's buffers stay alive while Deno's blocking pool holds a call that
 * points at them (vmm/sys/libc.ts pinnedCall). The probe runs in its own process with
 * `--expose-gc`; see iovec_gc_probe.ts for what it does.
 */

import assert from "node:assert/strict";

Deno.test("block file: iovecs of queued preadv/pwritev survive a GC (warmed up, blocking pool full)", async () => {
  const probe = new URL("./iovec_gc_probe.ts", import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--expose-gc", probe, "600", "50000"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.ok(out.success && /iovec-probe ok/.test(text), `probe failed (exit ${out.code}):\n${text}`);
});
