/** The default guest build: reproducible bytes, and what the initramfs holds. */

import assert from "node:assert/strict";
import { buildGuest, type GuestAssets } from "../../vmm/guest/build.ts";

async function sha(path: string): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", await Deno.readFile(path)));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function listCpio(path: string): Promise<string[]> {
  const out = await new Deno.Command("sh", {
    args: ["-c", `cpio -t < '${path}'`],
    stdout: "piped",
    stderr: "null",
  })
    .output();
  return new TextDecoder().decode(out.stdout).trim().split("\n");
}

Deno.test({
  name:
    "guest: two fresh builds give the same bytes; the initramfs has init, busybox, the virtio modules, mkfs",
  sanitizeResources: false,
  fn: async () => {
    const dirs = [await Deno.makeTempDir(), await Deno.makeTempDir()];
    try {
      const builds: GuestAssets[] = [];
      for (const d of dirs) {
        Deno.env.set("TSVMM_GUEST_DIR", d);
        builds.push(await buildGuest({ quiet: true }));
      }
      for (const line of ["6.1", "6.12"]) {
        const [a, b] = builds.map((g) => g.kernels[line]);
        assert.equal(a.package, b.package);
        assert.equal(
          await sha(a.initramfs),
          await sha(b.initramfs),
          `${line} initramfs differs between builds`,
        );
        assert.equal(await sha(a.vmlinux), await sha(b.vmlinux), `${line} vmlinux differs between builds`);
        const files = await listCpio(a.initramfs);
        for (const f of ["init", "bin/busybox", "etc/tsvmm/modules.order", "sbin/mke2fs", "sbin/mkfs.ext4"]) {
          assert.ok(files.includes(f), `${line}: ${f} missing from the initramfs`);
        }
        assert.ok(files.some((f) => /virtio_mmio\.ko$/.test(f)), `${line}: virtio_mmio.ko missing`);
        assert.ok(files.some((f) => /virtio_blk\.ko$/.test(f)), `${line}: virtio_blk.ko missing`);
      }
    } finally {
      Deno.env.delete("TSVMM_GUEST_DIR");
      for (const d of dirs) await Deno.remove(d, { recursive: true });
    }
  },
});
