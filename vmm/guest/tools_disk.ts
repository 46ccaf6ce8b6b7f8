/**
 * A tools disk for the benchmarks: Debian's fio and iperf3 with every shared library they
 * load, on an ext4 image made with `mke2fs -d` (no mount, no root). fio links librados and
 * librbd, whose closure is ~85 MB: too large for the default initramfs, so the tools travel
 * as a read-only virtio disk that the guest mounts when asked (`tsvmm.fio=`, `tsvmm.iperf=`).
 *
 * Layout of the image: `/fio`, `/iperf3`, `/ld.so` (the dynamic loader) and `/lib/*`; the
 * guest runs `/tools/ld.so --library-path /tools/lib /tools/fio ...`. The same files stay
 * unpacked beside the image (`ToolsDisk.tree`), so the nested runner can give L1 iperf3 too.
 */

import { exists, guestDir, run } from "./build.ts";

/** The programs on the tools disk: name on the disk -> Debian package and path in it. */
export const TOOL_PROGRAMS: Record<string, { package: string; path: string }> = {
  fio: { package: "fio", path: "usr/bin/fio" },
  iperf3: { package: "iperf3", path: "usr/bin/iperf3" },
};

/** A built tools disk. */
export interface ToolsDisk {
  /** The ext4 image. */
  image: string;
  /** The same files unpacked: `<program>`, `ld.so`, `lib/`. */
  tree: string;
  /** The libraries (names under `lib/`) each program loads. */
  libs: Record<string, string[]>;
}

/** Debian packages the programs and their libraries come from: their recursive library dependencies. */
async function toolPackages(): Promise<string[]> {
  const pkgs = new Set<string>();
  for (const { package: p } of Object.values(TOOL_PROGRAMS)) {
    const out = await run("apt-cache", [
      "depends",
      "--recurse",
      "--no-recommends",
      "--no-suggests",
      "--no-conflicts",
      "--no-breaks",
      "--no-replaces",
      "--no-enhances",
      p,
    ]);
    const deps = out.split("\n").filter((line) => /^(lib|zlib)[\w.+-]+$/.test(line));
    if (deps.length === 0) throw new Error(`apt-cache knows no dependencies of ${p} (run apt-get update?)`);
    pkgs.add(p);
    for (const d of deps) pkgs.add(d);
  }
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
    if (!file) throw new Error(`${m[1]} (needed by ${binary}) is in none of the tools' dependency packages`);
    libs.set(m[1], await Deno.realPath(file));
  }
  return libs;
}

/** Builds (or finds in the cache) the tools disk and its unpacked tree. */
export async function buildToolsDisk(opts: { quiet?: boolean } = {}): Promise<ToolsDisk> {
  const log = (s: string) => opts.quiet || console.error(`guest: ${s}`);
  const dir = guestDir();
  const debs = `${dir}/debs`;
  await Deno.mkdir(debs, { recursive: true });
  const pkgs = await toolPackages();
  // The cache key: the exact package versions apt would fetch, and the program list.
  const policy = await run("apt-cache", ["show", "--no-all-versions", ...pkgs]);
  const versions = [...policy.matchAll(/^Package: (\S+)\n(?:.*\n)*?Version: (\S+)/gm)].map((m) =>
    `${m[1]}=${m[2]}`
  );
  const key = versions.sort().join("\n") + JSON.stringify(TOOL_PROGRAMS);
  const stamp = Array.from(
    new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key))).subarray(0, 6),
  ).map((b) => b.toString(16).padStart(2, "0")).join("");
  const image = `${dir}/out/tools-${stamp}.ext4`;
  const tree = `${dir}/out/tools-${stamp}`;
  if (await exists(image) && await exists(`${tree}/libs.json`)) {
    return { image, tree, libs: JSON.parse(await Deno.readTextFile(`${tree}/libs.json`)) };
  }
  log(`building the tools disk (${Object.keys(TOOL_PROGRAMS).join(", ")}: ${pkgs.length} packages)`);
  const missing: string[] = [];
  const names = new Set<string>();
  for await (const e of Deno.readDir(debs)) names.add(e.name);
  for (const p of pkgs) {
    if (![...names].some((n) => n.startsWith(p + "_") && n.endsWith(".deb"))) missing.push(p);
  }
  if (missing.length) await run("apt-get", ["download", "-q", ...missing], debs);
  const root = await Deno.makeTempDir({ prefix: "tsvmm-tools-root-" });
  const stage = `${tree}.tmp`;
  await Deno.remove(stage, { recursive: true }).catch(() => {});
  await Deno.mkdir(`${stage}/lib`, { recursive: true });
  try {
    for await (const e of Deno.readDir(debs)) {
      const pkg = e.name.split("_")[0];
      if (pkgs.includes(pkg) && e.name.endsWith(".deb")) {
        await run("dpkg-deb", ["-x", `${debs}/${e.name}`, root]);
      }
    }
    let bytes = 0;
    const libs: Record<string, string[]> = {};
    const copied = new Set<string>();
    for (const [name, { path }] of Object.entries(TOOL_PROGRAMS)) {
      const bin = `${root}/${path}`;
      await Deno.copyFile(bin, `${stage}/${name}`);
      await Deno.chmod(`${stage}/${name}`, 0o755);
      bytes += (await Deno.stat(bin)).size;
      const closure = await libraryClosure(root, bin);
      libs[name] = [...closure.keys()].sort();
      for (const [lib, file] of closure) {
        if (copied.has(lib)) continue;
        copied.add(lib);
        await Deno.copyFile(file, `${stage}/lib/${lib}`);
        bytes += (await Deno.stat(file)).size;
      }
    }
    const loader = `${root}/lib64/ld-linux-x86-64.so.2`;
    if (!(await exists(loader))) throw new Error("libc6 brought no ld-linux-x86-64.so.2");
    await Deno.copyFile(await Deno.realPath(loader), `${stage}/ld.so`);
    await Deno.chmod(`${stage}/ld.so`, 0o755);
    // Room for ext4's metadata: a quarter more than the files, plus 16 MiB.
    const kib = Math.ceil((bytes * 1.25) / 1024) + 16 * 1024;
    await Deno.mkdir(`${dir}/out`, { recursive: true });
    await run("mke2fs", [
      "-q",
      "-F",
      "-t",
      "ext4",
      "-L",
      "tsvmm-tools",
      "-d",
      stage,
      `${image}.tmp`,
      `${kib}k`,
    ]);
    // Written after the image, so it is not on the disk; its presence marks a finished tree.
    await Deno.writeTextFile(`${stage}/libs.json`, JSON.stringify(libs));
    await Deno.remove(tree, { recursive: true }).catch(() => {});
    await Deno.rename(stage, tree);
    await Deno.rename(`${image}.tmp`, image);
    return { image, tree, libs };
  } finally {
    await Deno.remove(root, { recursive: true });
    await Deno.remove(stage, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) console.log(JSON.stringify(await buildToolsDisk(), null, 2));
