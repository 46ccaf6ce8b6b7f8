/**
 * `deno task guest`: the default guest, built from Debian packages only (apt-get download
 * + dpkg-deb -x, never installed) into a cache: the 6.1 and 6.12 cloud kernels, their
 * unpacked vmlinux ELFs, and one initramfs per kernel written by our cpio writer with
 * busybox-static, the virtio modules in dependency order, and our /init.
 */

import { CpioTree } from "./cpio.ts";
import { loadOrder, parseModulesBuiltin, parseModulesDep } from "./modules.ts";
import { parseKernel } from "../boot/kernel_image.ts";
import { unpackBzImage } from "../boot/unpack.ts";

/** Kernel command line for the default guest. */
export const GUEST_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet tsvmm.shell=1";

/** Virtio modules the initramfs carries (with their dependencies). */
export const GUEST_MODULES = ["virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_rng"];

/** Bumped when the initramfs layout changes, so cached images are rebuilt. */
const RECIPE_VERSION = 2;

/** Debian packages that give the guest (and the nested runner's L1) mke2fs and e2fsck. */
export const E2FS_PACKAGES = ["e2fsprogs", "libext2fs2", "libcom-err2", "libblkid1", "libuuid1", "libc6"];
/** Programs taken from them, with the names they are also called by. */
const E2FS_PROGRAMS: Record<string, string[]> = {
  "sbin/mke2fs": ["sbin/mkfs.ext4"],
  "sbin/e2fsck": ["sbin/fsck.ext4"],
};

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
  /** Where the e2fsprogs packages are extracted (one tree). */
  userland?: string;
  /** Kernels by line. */
  kernels: Record<string, GuestKernel>;
  /** initramfs of the 6.1 kernel (the default). */
  initramfs: string;
  /** The tools disk (vmm/guest/tools_disk.ts: fio, iperf3), when the benchmark built it. */
  toolsImage?: string;
}

/** The cache directory: $TSVMM_CACHE or .cache/guest in the project. */
export function guestDir(): string {
  return Deno.env.get("TSVMM_GUEST_DIR") ?? new URL("../../.cache/guest", import.meta.url).pathname;
}

/** Runs a command; resolves with its stdout, throws with the last lines of stderr. */
export async function run(cmd: string, args: string[], cwd?: string): Promise<string> {
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

/** Whether a path exists. */
export async function exists(p: string): Promise<boolean> {
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
export async function fetchAndExtract(pkg: string, dir: string, into: string): Promise<void> {
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

/**
 * Dynamically linked programs from an extracted package tree, with the libraries they
 * need (found by ldd's names in the same tree): [path in the image, file] and symlinks.
 */
export async function userlandFiles(
  root: string,
): Promise<{ files: Array<[string, string]>; links: Array<[string, string]> }> {
  const files: Array<[string, string]> = [];
  const links: Array<[string, string]> = [];
  const libs = new Set<string>();
  for (const [prog, aliases] of Object.entries(E2FS_PROGRAMS)) {
    files.push([prog, `${root}/${prog}`]);
    for (const a of aliases) links.push([a, prog.split("/").pop()!]);
    const out = await run("ldd", [`${root}/${prog}`]);
    for (const m of out.matchAll(/^\s*(\S+\.so[.\d]*)\s/gm)) libs.add(m[1].split("/").pop()!);
  }
  for (const name of [...libs].sort()) {
    if (name.startsWith("linux-vdso")) continue;
    let found: string | undefined;
    for (const d of ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]) {
      if (await exists(`${root}/${d}/${name}`)) {
        found = await Deno.realPath(`${root}/${d}/${name}`);
        break;
      }
    }
    if (!found) throw new Error(`${name} (needed by e2fsprogs) is in none of ${E2FS_PACKAGES.join(", ")}`);
    files.push([name.startsWith("ld-linux") ? `lib64/${name}` : `lib/x86_64-linux-gnu/${name}`, found]);
  }
  return { files, links };
}

/** Builds the initramfs for a kernel whose package is extracted at `root`. */
export async function buildInitramfs(
  root: string,
  release: string,
  busybox: Uint8Array,
  userland: string,
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
    const tree = new CpioTree();
    const enc = new TextEncoder();
    for (const d of ["dev", "proc", "sys", "tmp", "mnt", "root"]) tree.dir(d);
    tree.file("init", enc.encode(await Deno.readTextFile(new URL("./init.sh", import.meta.url))), 0o755);
    tree.file("bin/busybox", busybox, 0o755);
    tree.symlink("bin/sh", "busybox");
    tree.file("etc/tsvmm/modules.order", enc.encode(order.join("\n") + "\n"));
    const ul = await userlandFiles(userland);
    for (const [path, file] of ul.files) tree.file(path, await Deno.readFile(file), 0o755);
    for (const [path, target] of ul.links) tree.symlink(path, target);
    tree.file(`lib/modules/${release}/modules.dep`, enc.encode(depText));
    for (const [rel, data] of files.sort((a, b) => a[0].localeCompare(b[0]))) {
      tree.file(`lib/modules/${release}/${rel}`, data);
    }
    return tree.bytes();
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
  const userland = `${dir}/userland`;
  if (!(await exists(userland))) {
    const tmp = `${userland}.parts`;
    for (const p of E2FS_PACKAGES) await fetchAndExtract(p, debs, `${tmp}/${p}`);
    // One tree: copy each package's files in (they do not overlap).
    await Deno.mkdir(`${userland}.tmp`, { recursive: true });
    for (const p of E2FS_PACKAGES) await run("cp", ["-a", `${tmp}/${p}/.`, `${userland}.tmp/`]);
    await Deno.rename(`${userland}.tmp`, userland);
    await Deno.remove(tmp, { recursive: true });
  }
  const kernels: Record<string, GuestKernel> = {};
  // Outputs are keyed by the recipe (init script, module and program lists) so edits rebuild them.
  const recipe = new TextEncoder().encode(
    (await Deno.readTextFile(new URL("./init.sh", import.meta.url))) +
      JSON.stringify([RECIPE_VERSION, GUEST_MODULES, E2FS_PACKAGES, E2FS_PROGRAMS]),
  );
  const stamp = Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", recipe)).subarray(0, 6))
    .map((b) => b.toString(16).padStart(2, "0")).join("");
  for (const [line, meta] of Object.entries(KERNEL_PACKAGES)) {
    const pkg = await resolveKernelPackage(meta);
    const release = pkg.replace(/^linux-image-/, "");
    const root = `${dir}/${pkg}`;
    const out = `${dir}/out/${release}-${stamp}`;
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
    const vmlinux = `${dir}/out/${release}.vmlinux`;
    if (!(await exists(vmlinux))) {
      const bz = parseKernel(await Deno.readFile(k.bzImage), k.bzImage);
      if (bz.kind !== "bzimage") throw new Error(`${k.bzImage} is not a bzImage`);
      await Deno.writeFile(vmlinux + ".tmp", await unpackBzImage(bz, k.bzImage));
      await Deno.rename(vmlinux + ".tmp", vmlinux);
    }
    await Deno.remove(k.vmlinux).catch(() => {});
    await Deno.link(vmlinux, k.vmlinux);
    await Deno.writeFile(k.initramfs + ".tmp", await buildInitramfs(root, release, busybox, userland));
    await Deno.rename(k.initramfs + ".tmp", k.initramfs);
  }
  return { dir, userland, kernels, initramfs: kernels["6.1"].initramfs };
}

if (import.meta.main) {
  const g = await buildGuest();
  for (const [line, k] of Object.entries(g.kernels)) {
    console.log(`${line}: ${k.package}\n  vmlinux   ${k.vmlinux}\n  initramfs ${k.initramfs}`);
  }
}
