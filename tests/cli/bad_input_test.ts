/**
 * Bad user input: each case gets one clear error line on stderr, a non-zero exit and
 * no stack trace, before any guest runs. Everything but KVM itself is checked before
 * the KVM device is opened, so each case is run twice: against this host's /dev/kvm
 * (whatever it is, or is not) and against a KVM device path that does not exist, and
 * must give the same line both times.
 */

import assert from "node:assert/strict";
import { buildGuest } from "../../vmm/guest/build.ts";

const CLI = new URL("../../vmm/cli.ts", import.meta.url).pathname;

async function cli(
  args: string[],
  opts: { asNobody?: boolean; cpus?: string; netns?: string; noNetAdmin?: boolean } = {},
) {
  let cmd = Deno.execPath();
  let argv = ["run", "-A", CLI, ...args];
  if (opts.noNetAdmin) {
    // Still root, but without CAP_NET_ADMIN (dropped from the bounding set before exec).
    argv = ["--bounding-set=-net_admin", "--inh-caps=-net_admin", cmd, ...argv];
    cmd = "setpriv";
  }
  if (opts.netns) {
    argv = ["netns", "exec", opts.netns, cmd, ...argv];
    cmd = "ip";
  }
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

const NO_KVM = "/nonexistent/kvm";

function assertOneLine(r: { code: number; stderr: string }, pattern: RegExp): void {
  assert.notEqual(r.code, 0, "non-zero exit");
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `one line on stderr, got:\n${r.stderr}`);
  assert.match(lines[0], /^error: /);
  assert.match(lines[0], pattern);
  assert.doesNotMatch(r.stderr, /^\s+at /m, "no stack trace");
}

/** The same one-line error with this host's KVM device and with none at all. */
async function assertBadInput(
  args: string[],
  pattern: RegExp,
  opts: { cpus?: string; netns?: string; noNetAdmin?: boolean } = {},
): Promise<void> {
  const here = await cli(args, opts);
  assertOneLine(here, pattern);
  const none = await cli([...args, "--kvm", NO_KVM], opts);
  assertOneLine(none, pattern);
  assert.equal(none.stderr.trim(), here.stderr.trim(), "the same error with and without a KVM device");
}

const guest = await buildGuest({ quiet: true });
const kernel = guest.kernels["6.1"].vmlinux;

Deno.test("bad input: missing kernel file", async () => {
  await assertBadInput(
    ["--kernel", "/nonexistent/vmlinux"],
    /Cannot read kernel "\/nonexistent\/vmlinux": no such file/,
  );
});

Deno.test("bad input: a file that is not a kernel", async () => {
  const f = await Deno.makeTempFile();
  await Deno.writeTextFile(f, "just text\n".repeat(100));
  await assertBadInput(["--kernel", f], /is not a Linux kernel/);
  await Deno.remove(f);
});

Deno.test("bad input: a truncated ELF is not a bootable kernel", async () => {
  const f = await Deno.makeTempFile();
  const k = await Deno.open(kernel);
  const head = new Uint8Array(4096);
  await k.read(head);
  k.close();
  await Deno.writeFile(f, head.subarray(0, 100));
  await assertBadInput(["--kernel", f], /not a bootable x86-64 ELF kernel/);
  await Deno.remove(f);
});

Deno.test("bad input: unreadable initrd (missing, or a directory)", async () => {
  await assertBadInput(["--kernel", kernel, "--initrd", "/nonexistent.cpio"], /Cannot read initrd/);
  await assertBadInput(["--kernel", kernel, "--initrd", "/tmp"], /Cannot read initrd "\/tmp"/);
});

Deno.test("bad input: a valid config with no KVM device, and with no permission on it", async () => {
  // Valid in every other way: the one error is that there is no KVM.
  assertOneLine(
    await cli(["--kernel", kernel, "--initrd", guest.kernels["6.1"].initramfs, "--kvm", NO_KVM]),
    /^error: KVM is not available: \/nonexistent\/kvm does not exist$/,
  );
  // A KVM device path this user may not open (a root-only file, opened as nobody).
  const dir = await Deno.makeTempDir();
  await Deno.chmod(dir, 0o755);
  const dev = `${dir}/kvm`;
  await Deno.writeFile(dev, new Uint8Array(0), { mode: 0o600 });
  await Deno.chmod(dev, 0o600);
  try {
    const r = await cli(["--kernel", kernel, "--kvm", dev], { asNobody: true });
    assertOneLine(r, new RegExp(`^error: Cannot open ${dev}: permission denied`));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("bad input: disk images missing, locked by another process, or a directory", async () => {
  await assertBadInput(
    ["--kernel", kernel, "--disk", "/nonexistent/disk.img"],
    /Cannot open disk "\/nonexistent\/disk.img": no such file/,
  );
  await assertBadInput(["--kernel", kernel, "--disk", "/tmp"], /Cannot open disk "\/tmp": /);
  const img = await Deno.makeTempFile({ suffix: ".img" });
  await Deno.writeFile(img, new Uint8Array(1024 * 1024));
  // flock(1) holds an exclusive lock while it sleeps.
  const holder = new Deno.Command("flock", {
    args: ["-x", img, "sleep", "60"],
    stdout: "null",
    stderr: "null",
  })
    .spawn();
  try {
    await new Promise((r) => setTimeout(r, 300));
    await assertBadInput(["--kernel", kernel, "--disk", img], /it is locked by another process/);
    await assertBadInput(
      ["--kernel", kernel, "--disk", `${img},readonly`],
      /it is locked by another process/,
    );
  } finally {
    holder.kill("SIGKILL");
    await holder.status;
    await Deno.remove(img);
  }
});

Deno.test("bad input: memory too small for the kernel, or more than the host has", async () => {
  await assertBadInput(
    ["--kernel", kernel, "--memory", "32"],
    /too small for this kernel: it needs at least \d+ MiB/,
  );
  await assertBadInput(["--kernel", kernel, "--memory", "100000G"], /more than this host's \d+ MiB/);
  await assertBadInput(["--kernel", kernel, "--memory", "lots"], /not a size/);
});

Deno.test("bad input: command line over the kernel's limit", async () => {
  await assertBadInput(
    ["--kernel", kernel, "--cmdline", "x".repeat(3000)],
    /command line is 3000 bytes; this kernel accepts at most 2047/,
  );
});

Deno.test("bad input: bad flags and values", async () => {
  await assertBadInput(["--bogus"], /Unknown option '--bogus'/);
  await assertBadInput(["--kernel", kernel, "--cpus", "0"], /--cpus must be an integer from 1/);
  await assertBadInput(["--kernel", kernel, "--cpus", "two"], /--cpus "two" is not a whole number/);
  await assertBadInput(["--kernel", kernel, "--cpuid-mask=-nosuch"], /neither a known feature/);
});

Deno.test("bad input: --pin-vcpus in a process limited to one CPU", async () => {
  await assertBadInput(
    ["--kernel", kernel, "--pin-vcpus"],
    /--pin-vcpus needs at least 2 host CPUs .* this process may use 1$/,
    {
      cpus: "0",
    },
  );
});

async function sh(cmd: string): Promise<string> {
  const out = await new Deno.Command("sh", { args: ["-c", cmd], stdout: "piped", stderr: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${cmd}: ${text}`);
  return text;
}

/** Runs `fn` with a network namespace of its own (deleted afterwards, with whatever is in it). */
async function withNetns(fn: (ns: string) => Promise<void>): Promise<void> {
  const ns = `tsvmm-bad-${Deno.pid}`;
  await sh(`ip netns add ${ns}`);
  try {
    await fn(ns);
  } finally {
    await sh(`ip netns del ${ns}`);
  }
}

/** The interfaces in namespace `ns` other than loopback. */
async function links(ns: string): Promise<string[]> {
  return (await sh(`ip netns exec ${ns} ip -o link show`)).split("\n").filter(Boolean)
    .map((l) => l.split(":")[1].trim().split("@")[0]).filter((n) => n !== "lo");
}

Deno.test("bad input: --net values (MAC, MTU, name, options)", async () => {
  await assertBadInput(
    ["--kernel", kernel, "--net", "tap=t0,mac=01:00:5e:00:00:01"],
    /is a multicast address/,
  );
  await assertBadInput(["--kernel", kernel, "--net", "tap=t0,mac=52:54:00:zz:00:01"], /is not six hex bytes/);
  await assertBadInput(["--kernel", kernel, "--net", "tap=t0,mac=00:00:00:00:00:00"], /is all zero/);
  await assertBadInput(
    ["--kernel", kernel, "--net", "tap=t0,mtu=20"],
    /mtu must be an integer from 68 to 65535/,
  );
  await assertBadInput(
    ["--kernel", kernel, "--net", "tap=t0,mtu=big"],
    /--net mtu "big" is not a whole number/,
  );
  await assertBadInput(["--kernel", kernel, "--net", "tap=a-name-that-is-too-long"], /1 to 15 bytes/);
  await assertBadInput(
    ["--kernel", kernel, "--net", "mac=52:54:00:00:00:01"],
    /needs either tap=NAME or fd=N/,
  );
  await assertBadInput(["--kernel", kernel, "--net", "tap=t0,speed=10"], /unknown option "speed=10"/);
  await assertBadInput(["--kernel", kernel, "--net", "tap=t0,transport=usb"], /transport must be pci/);
  await assertBadInput(["--kernel", kernel, "--net", "fd=99"], /TAP fd 99 is not open in this process/);
});

Deno.test("bad input: --net TAP missing without permission to create it, busy, or not a TAP", async () => {
  await withNetns(async (ns) => {
    // No CAP_NET_ADMIN: a missing TAP cannot be created, nor one owned by another user attached.
    await assertBadInput(
      ["--kernel", kernel, "--net", "tap=tsvmm-np0"],
      /cannot create TAP "tsvmm-np0": permission denied/,
      {
        netns: ns,
        noNetAdmin: true,
      },
    );
    assert.deepEqual(await links(ns), [], "nothing created");
    await sh(`ip netns exec ${ns} ip tuntap add tsvmm-np1 mode tap user 65534`);
    await assertBadInput(
      ["--kernel", kernel, "--net", "tap=tsvmm-np1"],
      /cannot attach TAP "tsvmm-np1": permission denied/,
      {
        netns: ns,
        noNetAdmin: true,
      },
    );
    await sh(`ip netns exec ${ns} ip tuntap del tsvmm-np1 mode tap`);
    // Busy: another process holds the TAP (one it created, so it goes when that process ends).
    const holder = new Deno.Command("ip", {
      args: [
        "netns",
        "exec",
        ns,
        Deno.execPath(),
        "eval",
        `import { Tap } from "${new URL("../../vmm/tap.ts", import.meta.url).href}";
         Tap.open({ name: "tsvmm-busy" }); console.log("ready"); await new Promise((r) => setTimeout(r, 60000));`,
      ],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    try {
      const reader = holder.stdout.getReader();
      const { value } = await reader.read();
      assert.match(new TextDecoder().decode(value), /ready/);
      reader.releaseLock();
      await assertBadInput(["--kernel", kernel, "--net", "tap=tsvmm-busy"], /TAP "tsvmm-busy" is busy/, {
        netns: ns,
      });
    } finally {
      holder.kill("SIGKILL");
      await holder.status;
      await holder.stdout.cancel();
    }
    // An interface that is not a TAP.
    await assertBadInput(
      ["--kernel", kernel, "--net", "tap=lo"],
      /"lo" is a network interface but not a TAP/,
      {
        netns: ns,
      },
    );
    assert.deepEqual(await links(ns), [], "nothing left behind");
  });
});
