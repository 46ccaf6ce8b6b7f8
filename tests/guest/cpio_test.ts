import assert from "node:assert/strict";
import { writeCpio } from "../../vmm/guest/cpio.ts";
import { loadOrder, parseModulesBuiltin, parseModulesDep } from "../../vmm/guest/modules.ts";

const enc = new TextEncoder();

Deno.test("cpio: cpio -t lists what we wrote, and cpio -i restores contents, modes and links", async () => {
  const archive = writeCpio([
    { type: "dir", path: "etc" },
    { type: "file", path: "etc/hello", data: enc.encode("hello\n") },
    { type: "file", path: "init", data: enc.encode("#!/bin/sh\n"), mode: 0o755 },
    { type: "file", path: "etc/odd", data: enc.encode("x".repeat(4097)) },
    { type: "symlink", path: "sh", target: "init" },
  ]);
  const dir = await Deno.makeTempDir();
  try {
    const list = new Deno.Command("cpio", { args: ["-t"], stdin: "piped", stdout: "piped", stderr: "piped" })
      .spawn();
    const w = list.stdin.getWriter();
    await w.write(archive);
    await w.close();
    const out = await list.output();
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    assert.deepEqual(new TextDecoder().decode(out.stdout).trim().split("\n"), [
      "etc",
      "etc/hello",
      "init",
      "etc/odd",
      "sh",
    ]);
    const ex = new Deno.Command("cpio", { args: ["-idm"], cwd: dir, stdin: "piped", stderr: "piped" })
      .spawn();
    const w2 = ex.stdin.getWriter();
    await w2.write(archive);
    await w2.close();
    assert.ok((await ex.status).success);
    assert.equal(await Deno.readTextFile(`${dir}/etc/hello`), "hello\n");
    assert.equal((await Deno.readTextFile(`${dir}/etc/odd`)).length, 4097);
    assert.equal((await Deno.stat(`${dir}/init`)).mode! & 0o777, 0o755);
    assert.equal(await Deno.readLink(`${dir}/sh`), "init");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cpio: output is deterministic and 4-byte aligned, ends with the trailer", () => {
  const a = writeCpio([{ type: "file", path: "a", data: enc.encode("abc") }]);
  const b = writeCpio([{ type: "file", path: "a", data: enc.encode("abc") }]);
  assert.deepEqual(a, b);
  assert.equal(a.length % 4, 0);
  assert.match(new TextDecoder().decode(a), /070701.*TRAILER!!!/s);
  assert.throws(() => writeCpio([{ type: "dir", path: "../x" }]));
});

Deno.test("modules.dep: dependencies load first, shared ones once; built-ins are skipped", () => {
  const dep = parseModulesDep([
    "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko",
    "kernel/net/core/failover.ko:",
    "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio_ring.ko:",
    "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko",
  ].join("\n"));
  const order = loadOrder(
    dep,
    ["virtio_net", "virtio_rng", "virtio_pci"],
    parseModulesBuiltin("kernel/drivers/virtio/virtio_pci.ko\n"),
  );
  // Exactly these modules, each once (virtio_pci is built in)...
  assert.deepEqual(
    [...order].sort(),
    [
      "kernel/drivers/char/hw_random/virtio-rng.ko",
      "kernel/drivers/net/net_failover.ko",
      "kernel/drivers/net/virtio_net.ko",
      "kernel/drivers/virtio/virtio.ko",
      "kernel/drivers/virtio/virtio_ring.ko",
      "kernel/net/core/failover.ko",
    ],
  );
  // ...and every one after all of its dependencies.
  for (const [i, m] of order.entries()) {
    for (const d of dep.get(m) ?? []) {
      assert.ok(order.indexOf(d) >= 0 && order.indexOf(d) < i, `${d} loads before ${m}: ${order.join(" ")}`);
    }
  }
  const pos = (m: string) => order.findIndex((p) => p.endsWith(`/${m}.ko`));
  assert.ok(pos("failover") < pos("net_failover"));
  assert.ok(pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_net"));
  assert.ok(pos("virtio") < pos("virtio-rng"));
  assert.equal(order.length, 6);
  assert.throws(() => loadOrder(dep, ["nosuch"]), /not in modules.dep/);
  assert.throws(
    () => loadOrder(parseModulesDep("a.ko: b.ko\nb.ko: a.ko\n"), ["a"]),
    /cycle/,
  );
});
