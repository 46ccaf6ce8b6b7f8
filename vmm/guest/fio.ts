/**
 * A tools disk for the I/O benchmark: Debian's fio with every shared library it loads,
 * on an ext4 image made with `mke2fs -d` (no mount, no root). fio links librados and
 * librbd, whose closure is ~85 MB: too large for the default initramfs, so it travels
 * as a read-only virtio disk that the guest mounts when asked (`tsvmm.fio=`).
 *
 * Layout of the image: `/fio`, `/ld.so` (the dynamic loader) and `/lib/*`; the guest
 * runs `/tools/ld.so --library-path /tools/lib /tools/fio ...`.
 */

import { exists, guestDir, run } from "./build.ts";

/** Debian packages fio's libraries come from: its recursive library dependencies. */
async function fioPackages(): Promise<string[]> {
  const out = await run("apt-cache", [
    "depends",
    "--recurse",
    "--no-recommends",
    "--no-suggests",
    "--no-conflicts",
    "--no-breaks",
    "--no-replaces",
    "--no-enhances",
    "fio",
  ]);
  const pkgs = new Set<string>(["fio"]);
  for (const line of out.split("\n")) {
    // Top-level lines name real packages; virtual ones are shown as <name>.
    if (/^(lib|zlib)[\w.+-]+$/.test(line)) pkgs.add(line);
  }
  if (pkgs.size < 2) throw new Error("apt-cache knows no dependencies of fio (run apt-get update?)");
  return [...pkgs].sort();
}

/** Every file under `dir` whose name has ".so", by name (first found wins). */
async function sharedObjects(dir: string, into = new Map<string, string>()): Promise<Map<string, string>> {
  for await (const e of Deno.readDir(dir)) {
    const p = `${dir}/${e.name}`;
    if (e.isDirectory) await sharedObjects(p, into);
    else if (e.name.includes(".so") && !into.has(e.name)) into.set(e.name, p);
  }
  return into;
}

/** The shared libraries `binary` loads, resolved inside `root` only. */
async function libraryClosure(root: string, binary: string): Promise<Map<string, string>> {
  const inTree = await sharedObjects(root);
  const dirs = [...new Set([...inTree.values()].map((p) => p.slice(0, p.lastIndexOf("/"))))];
  const out = await new Deno.Command("ldd", {
    args: [binary],
    env: { LD_LIBRARY_PATH: dirs.join(":") },
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(`ldd ${binary} failed: ${new TextDecoder().decode(out.stderr).trim()}`);
  const libs = new Map<string, string>();
  for (const line of new TextDecoder().decode(out.stdout).split("\n")) {
    const m = /^\s*(\S+)\s+=>\s+(\S+)/.exec(line);
    if (!m) continue;
    const file = inTree.get(m[1]);
    if (!file) throw new Error(`${m[1]} (needed by fio) is in none of fio's dependency packages`);
    libs.set(m[1], await Deno.realPath(file));
  }
  return libs;
}

/** Builds (or finds in the cache) the fio tools image; returns its path. */
export async function buildFioImage(opts: { quiet?: boolean } = {}): Promise<string> {
  const log = (s: string) => opts.quiet || console.error(`guest: ${s}`);
  const dir = guestDir();
  const debs = `${dir}/debs`;
  await Deno.mkdir(debs, { recursive: true });
  const pkgs = await fioPackages();
  // The cache key: the exact package versions apt would fetch.
  const policy = await run("apt-cache", ["show", "--no-all-versions", ...pkgs]);
  const versions = [...policy.matchAll(/^Package: (\S+)\n(?:.*\n)*?Version: (\S+)/gm)].map((m) =>
    `${m[1]}=${m[2]}`
  );
  const stamp = Array.from(
    new Uint8Array(
      await crypto.subtle.digest("SHA-256", new TextEncoder().encode(versions.sort().join("\n"))),
    )
      .subarray(0, 6),
  ).map((b) => b.toString(16).padStart(2, "0")).join("");
  const image = `${dir}/out/fio-tools-${stamp}.ext4`;
  if (await exists(image)) return image;
  log(`building the fio tools disk (${pkgs.length} packages)`);
  const missing: string[] = [];
  const names = new Set<string>();
  for await (const e of Deno.readDir(debs)) names.add(e.name);
  for (const p of pkgs) {
    if (![...names].some((n) => n.startsWith(p + "_") && n.endsWith(".deb"))) missing.push(p);
  }
  if (missing.length) await run("apt-get", ["download", "-q", ...missing], debs);
  const root = await Deno.makeTempDir({ prefix: "tsvmm-fio-root-" });
  const stage = await Deno.makeTempDir({ prefix: "tsvmm-fio-stage-" });
  try {
    for await (const e of Deno.readDir(debs)) {
      const pkg = e.name.split("_")[0];
      if (pkgs.includes(pkg) && e.name.endsWith(".deb")) {
        await run("dpkg-deb", ["-x", `${debs}/${e.name}`, root]);
      }
    }
    const fio = `${root}/usr/bin/fio`;
    const libs = await libraryClosure(root, fio);
    await Deno.mkdir(`${stage}/lib`);
    await Deno.copyFile(fio, `${stage}/fio`);
    let bytes = (await Deno.stat(fio)).size;
    for (const [name, file] of libs) {
      await Deno.copyFile(file, `${stage}/lib/${name}`);
      bytes += (await Deno.stat(file)).size;
    }
    const loader = `${root}/lib64/ld-linux-x86-64.so.2`;
    if (!(await exists(loader))) throw new Error("libc6 brought no ld-linux-x86-64.so.2");
    await Deno.copyFile(await Deno.realPath(loader), `${stage}/ld.so`);
    for (const f of ["fio", "ld.so"]) await Deno.chmod(`${stage}/${f}`, 0o755);
    // Room for ext4's metadata: a quarter more than the files, plus 16 MiB.
    const kib = Math.ceil((bytes * 1.25) / 1024) + 16 * 1024;
    await Deno.mkdir(`${dir}/out`, { recursive: true });
    await run("mke2fs", [
      "-q",
      "-F",
      "-t",
      "ext4",
      "-L",
      "tsvmm-fio",
      "-d",
      stage,
      `${image}.tmp`,
      `${kib}k`,
    ]);
    await Deno.rename(`${image}.tmp`, image);
    return image;
  } finally {
    await Deno.remove(root, { recursive: true });
    await Deno.remove(stage, { recursive: true });
  }
}

if (import.meta.main) console.log(await buildFioImage());
