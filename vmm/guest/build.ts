/**
 * `deno task guest`: the default guest, built from Debian packages only (apt-get download
 * + dpkg-deb -x, never installed) into a cache: the 6.1 and 6.12 cloud kernels, their
 * unpacked vmlinux ELFs, and one initramfs per kernel written by our cpio writer with
 * busybox-static, the virtio modules in dependency order, and our /init.
 */

import { type CpioEntry, writeCpio } from "./cpio.ts";
import { loadOrder, parseModulesBuiltin, parseModulesDep } from "./modules.ts";
import { parseKernel } from "../boot/kernel_image.ts";
import { unpackBzImage } from "../boot/unpack.ts";

/** Kernel command line for the default guest. */
export const GUEST_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet tsvmm.shell=1";

/** Virtio modules the initramfs carries (with their dependencies). */
export const GUEST_MODULES = ["virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_rng"];

/** The two kernel lines: Debian meta-package for each. */
export const KERNEL_PACKAGES: Record<string, string> = {
  "6.1": "linux-image-cloud-amd64",
  "6.12": "linux-image-6.12-cloud-amd64",
};

/** One built kernel. */
export interface GuestKernel {
  /** Debian package name (versioned). */
  package: string;
  /** Kernel release (uname -r). */
  release: string;
  /** The bzImage. */
  bzImage: string;
  /** The unpacked ELF. */
  vmlinux: string;
  /** initramfs for this kernel's modules. */
  initramfs: string;
}

/** What the guest build produced. */
export interface GuestAssets {
  /** Cache directory. */
  dir: string;
  /** Kernels by line. */
  kernels: Record<string, GuestKernel>;
  /** initramfs of the 6.1 kernel (the default). */
  initramfs: string;
}

/** The cache directory: $TSVMM_CACHE or .cache/guest in the project. */
export function guestDir(): string {
  return Deno.env.get("TSVMM_GUEST_DIR") ?? new URL("../../.cache/guest", import.meta.url).pathname;
}

async function run(cmd: string, args: string[], cwd?: string): Promise<string> {
  let out;
  try {
    out = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" }).output();
  } catch (e) {
    throw new Error(`Cannot run ${cmd}: ${(e as Error).message}`);
  }
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim().split("\n").slice(-3).join(" / ");
    throw new Error(`${cmd} ${args.join(" ")} failed: ${err}`);
  }
  return new TextDecoder().decode(out.stdout);
}

async function exists(p: string): Promise<boolean> {
  try {
    await Deno.stat(p);
    return true;
  } catch {
    return false;
  }
}

/** The versioned kernel package a meta-package depends on. */
async function resolveKernelPackage(meta: string): Promise<string> {
  const out = await run("apt-cache", ["depends", meta]);
  const m = /Depends: (linux-image-[^\s]+)/.exec(out);
  if (!m) throw new Error(`apt-cache knows no kernel behind ${meta} (run apt-get update?)`);
  return m[1];
}

/** Downloads a package's .deb into `dir` (if absent) and extracts it to `into`. */
async function fetchAndExtract(pkg: string, dir: string, into: string): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  const has = async () => {
    for await (const e of Deno.readDir(dir)) {
      if (e.name.startsWith(pkg + "_") && e.name.endsWith(".deb")) return e.name;
    }
    return undefined;
  };
  let deb = await has();
  if (!deb) {
    await run("apt-get", ["download", "-q", pkg], dir);
    deb = await has();
    if (!deb) throw new Error(`apt-get download ${pkg} left no .deb`);
  }
  if (!(await exists(into))) {
    const tmp = into + ".tmp";
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    await Deno.mkdir(tmp, { recursive: true });
    await run("dpkg-deb", ["-x", `${dir}/${deb}`, tmp]);
    await Deno.rename(tmp, into);
  }
}

async function readModule(path: string): Promise<Uint8Array> {
  if (path.endsWith(".xz")) {
    const out = await new Deno.Command("xz", { args: ["-dc", path], stdout: "piped" }).output();
    if (!out.success) throw new Error(`xz -dc ${path} failed`);
    return out.stdout;
  }
  return await Deno.readFile(path);
}

/** Builds the initramfs for a kernel whose package is extracted at `root`. */
export async function buildInitramfs(
  root: string,
  release: string,
  busybox: Uint8Array,
): Promise<Uint8Array> {
  const modRoot = `${root}/lib/modules/${release}`;
  // Packages ship without modules.dep (postinst makes it); make it in the extracted tree.
  if (!(await exists(`${modRoot}/modules.dep`))) await run("depmod", ["-b", root, release]);
  // Full dependency graph of the package's modules, then the closure we carry.
  const fullDep = parseModulesDep(await Deno.readTextFile(`${modRoot}/modules.dep`));
  const builtin = parseModulesBuiltin(await Deno.readTextFile(`${modRoot}/modules.builtin`));
  const needed = loadOrder(fullDep, GUEST_MODULES, builtin);
  // A staging tree of just those modules (uncompressed), and its own modules.dep.
  const stage = await Deno.makeTempDir({ prefix: "tsvmm-initramfs-" });
  try {
    const files: Array<[string, Uint8Array]> = [];
    for (const rel of needed) {
      const plain = rel.replace(/\.(xz|zst|gz)$/, "");
      const data = await readModule(`${modRoot}/${rel}`);
      const dst = `${stage}/lib/modules/${release}/${plain}`;
      await Deno.mkdir(dst.slice(0, dst.lastIndexOf("/")), { recursive: true });
      await Deno.writeFile(dst, data);
      files.push([plain, data]);
    }
    await run("depmod", ["-b", stage, release]);
    const depText = await Deno.readTextFile(`${stage}/lib/modules/${release}/modules.dep`);
    const order = loadOrder(parseModulesDep(depText), GUEST_MODULES, builtin);
    const entries: CpioEntry[] = [];
    const dirs = new Set<string>();
    const addDirs = (p: string) => {
      const parts = p.split("/");
      for (let i = 1; i < parts.length; i++) {
        const d = parts.slice(0, i).join("/");
        if (!dirs.has(d)) {
          dirs.add(d);
          entries.push({ type: "dir", path: d });
        }
      }
    };
    const add = (path: string, data: Uint8Array, mode = 0o644) => {
      addDirs(path);
      entries.push({ type: "file", path, data, mode });
    };
    for (const d of ["dev", "proc", "sys", "tmp", "mnt", "root"]) addDirs(`${d}/x`);
    add(
      "init",
      new TextEncoder().encode(await Deno.readTextFile(new URL("./init.sh", import.meta.url))),
      0o755,
    );
    add("bin/busybox", busybox, 0o755);
    entries.push({ type: "symlink", path: "bin/sh", target: "busybox" });
    add("etc/tsvmm/modules.order", new TextEncoder().encode(order.join("\n") + "\n"));
    add(`lib/modules/${release}/modules.dep`, new TextEncoder().encode(depText));
    for (const [rel, data] of files.sort((a, b) => a[0].localeCompare(b[0]))) {
      add(`lib/modules/${release}/${rel}`, data);
    }
    return writeCpio(entries);
  } finally {
    await Deno.remove(stage, { recursive: true });
  }
}

/** Builds (or finds in the cache) the default guest's kernels and initramfs images. */
export async function buildGuest(opts: { quiet?: boolean } = {}): Promise<GuestAssets> {
  const log = (s: string) => opts.quiet || console.error(`guest: ${s}`);
  const dir = guestDir();
  const debs = `${dir}/debs`;
  await Deno.mkdir(debs, { recursive: true });
  const bbRoot = `${dir}/busybox-static`;
  await fetchAndExtract("busybox-static", debs, bbRoot);
  const busybox = await Deno.readFile(`${bbRoot}/bin/busybox`);
  const kernels: Record<string, GuestKernel> = {};
  for (const [line, meta] of Object.entries(KERNEL_PACKAGES)) {
    const pkg = await resolveKernelPackage(meta);
    const release = pkg.replace(/^linux-image-/, "");
    const root = `${dir}/${pkg}`;
    const out = `${dir}/out/${release}`;
    const k: GuestKernel = {
      package: pkg,
      release,
      bzImage: `${root}/boot/vmlinuz-${release}`,
      vmlinux: `${out}/vmlinux`,
      initramfs: `${out}/initramfs.cpio`,
    };
    kernels[line] = k;
    if (await exists(k.initramfs) && await exists(k.vmlinux)) continue;
    log(`building ${pkg}`);
    await fetchAndExtract(pkg, debs, root);
    await Deno.mkdir(out, { recursive: true });
    const bz = parseKernel(await Deno.readFile(k.bzImage), k.bzImage);
    if (bz.kind !== "bzimage") throw new Error(`${k.bzImage} is not a bzImage`);
    await Deno.writeFile(k.vmlinux + ".tmp", await unpackBzImage(bz, k.bzImage));
    await Deno.rename(k.vmlinux + ".tmp", k.vmlinux);
    await Deno.writeFile(k.initramfs + ".tmp", await buildInitramfs(root, release, busybox));
    await Deno.rename(k.initramfs + ".tmp", k.initramfs);
  }
  return { dir, kernels, initramfs: kernels["6.1"].initramfs };
}

if (import.meta.main) {
  const g = await buildGuest();
  for (const [line, k] of Object.entries(g.kernels)) {
    console.log(`${line}: ${k.package}\n  vmlinux   ${k.vmlinux}\n  initramfs ${k.initramfs}`);
  }
}
