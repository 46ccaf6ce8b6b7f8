/**
 * Bad user input: each case gets one clear error line on stderr, a non-zero exit and
 * no stack trace, before any guest runs.
 */

import assert from "node:assert/strict";
import { buildGuest } from "../../vmm/guest/build.ts";

const CLI = new URL("../../vmm/cli.ts", import.meta.url).pathname;

async function cli(args: string[], opts: { asNobody?: boolean; cpus?: string } = {}) {
  let cmd = Deno.execPath();
  let argv = ["run", "-A", CLI, ...args];
  if (opts.cpus) {
    argv = ["-c", opts.cpus, cmd, ...argv]; // taskset: the CPUs the process may use
    cmd = "taskset";
  }
  const env: Record<string, string> = { NO_COLOR: "1" };
  if (opts.asNobody) {
    argv = ["--reuid=65534", "--regid=65534", "--clear-groups", cmd, ...argv];
    cmd = "setpriv";
    env.DENO_DIR = await Deno.makeTempDir();
    await Deno.chmod(env.DENO_DIR, 0o777);
  }
  const out = await new Deno.Command(cmd, {
    args: argv,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const stderr = new TextDecoder().decode(out.stderr).replace(/^Download .*\n/gm, "");
  return { code: out.code, stderr };
}

function assertOneLine(r: { code: number; stderr: string }, pattern: RegExp): void {
  assert.notEqual(r.code, 0, "non-zero exit");
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `one line on stderr, got:\n${r.stderr}`);
  assert.match(lines[0], /^error: /);
  assert.match(lines[0], pattern);
  assert.doesNotMatch(r.stderr, /^\s+at /m, "no stack trace");
}

const guest = await buildGuest({ quiet: true });
const kernel = guest.kernels["6.1"].vmlinux;

Deno.test("bad input: missing kernel file", async () => {
  assertOneLine(
    await cli(["--kernel", "/nonexistent/vmlinux"]),
    /Cannot read kernel "\/nonexistent\/vmlinux": no such file/,
  );
});

Deno.test("bad input: a file that is not a kernel", async () => {
  const f = await Deno.makeTempFile();
  await Deno.writeTextFile(f, "just text\n".repeat(100));
  assertOneLine(await cli(["--kernel", f]), /is not a Linux kernel/);
  await Deno.remove(f);
});

Deno.test("bad input: a truncated ELF is not a bootable kernel", async () => {
  const f = await Deno.makeTempFile();
  const k = await Deno.open(kernel);
  const head = new Uint8Array(4096);
  await k.read(head);
  k.close();
  await Deno.writeFile(f, head.subarray(0, 100));
  assertOneLine(await cli(["--kernel", f]), /not a bootable x86-64 ELF kernel/);
  await Deno.remove(f);
});

Deno.test("bad input: unreadable initrd (missing, or a directory)", async () => {
  assertOneLine(await cli(["--kernel", kernel, "--initrd", "/nonexistent.cpio"]), /Cannot read initrd/);
  assertOneLine(await cli(["--kernel", kernel, "--initrd", "/tmp"]), /Cannot read initrd "\/tmp"/);
});

Deno.test("bad input: no KVM device, and no permission on it", async () => {
  assertOneLine(await cli(["--kernel", kernel, "--kvm", "/nonexistent/kvm"]), /KVM is not available/);
  const r = await cli(["--kernel", kernel], { asNobody: true });
  assertOneLine(r, /Cannot open \/dev\/kvm: permission denied/);
});

Deno.test("bad input: memory too small for the kernel, or more than the host has", async () => {
  assertOneLine(
    await cli(["--kernel", kernel, "--memory", "32"]),
    /too small for this kernel: it needs at least \d+ MiB/,
  );
  assertOneLine(await cli(["--kernel", kernel, "--memory", "100000G"]), /more than this host's \d+ MiB/);
  assertOneLine(await cli(["--kernel", kernel, "--memory", "lots"]), /not a size/);
});

Deno.test("bad input: command line over the kernel's limit", async () => {
  assertOneLine(
    await cli(["--kernel", kernel, "--cmdline", "x".repeat(3000)]),
    /command line is 3000 bytes; this kernel accepts at most 2047/,
  );
});

Deno.test("bad input: bad flags and values", async () => {
  assertOneLine(await cli(["--bogus"]), /Unknown option '--bogus'/);
  assertOneLine(await cli(["--kernel", kernel, "--cpus", "0"]), /--cpus must be an integer from 1/);
  assertOneLine(await cli(["--kernel", kernel, "--cpus", "two"]), /--cpus "two" is not a whole number/);
  assertOneLine(await cli(["--kernel", kernel, "--cpuid-mask=-nosuch"]), /neither a known feature/);
});

Deno.test("bad input: --pin-vcpus in a process limited to one CPU", async () => {
  const r = await cli(["--kernel", kernel, "--pin-vcpus"], { cpus: "0" });
  assertOneLine(r, /--pin-vcpus needs at least 2 host CPUs .* this process may use 1$/);
});
