/** Kernel module dependency order from a modules.dep file (as written by depmod). */

/** Parses modules.dep: module path -> its dependencies' paths. */
export function parseModulesDep(text: string): Map<string, string[]> {
  const deps = new Map<string, string[]>();
  for (const line of text.split("\n")) {
    const i = line.indexOf(":");
    if (i < 0) continue;
    deps.set(line.slice(0, i).trim(), line.slice(i + 1).trim().split(/\s+/).filter(Boolean));
  }
  return deps;
}

/** The basename of a module path without .ko and compression suffix, with '-' as '_'. */
export function moduleName(path: string): string {
  return path.split("/").pop()!.replace(/\.ko(\.(xz|zst|gz))?$/, "").replaceAll("-", "_");
}

/**
 * Module paths to load, dependencies before dependants, for the wanted module names.
 * Throws if a wanted module is missing or the dependencies form a cycle.
 */
export function loadOrder(
  deps: Map<string, string[]>,
  wanted: string[],
  builtin: ReadonlySet<string> = new Set(),
): string[] {
  const byName = new Map<string, string>();
  for (const p of deps.keys()) byName.set(moduleName(p), p);
  const order: string[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = (p: string, chain: string[]) => {
    const s = state.get(p);
    if (s === "done") return;
    if (s === "visiting") throw new Error(`module dependency cycle: ${[...chain, p].join(" -> ")}`);
    state.set(p, "visiting");
    for (const d of deps.get(p) ?? []) {
      if (!deps.has(d)) throw new Error(`module ${p} depends on ${d}, which modules.dep does not list`);
      visit(d, [...chain, p]);
    }
    state.set(p, "done");
    order.push(p);
  };
  for (const w of wanted) {
    const p = byName.get(w.replaceAll("-", "_"));
    if (!p && builtin.has(w.replaceAll("-", "_"))) continue; // built into the kernel
    if (!p) throw new Error(`module ${w} is not in modules.dep`);
    visit(p, []);
  }
  return order;
}

/** Names of the modules built into the kernel, from modules.builtin. */
export function parseModulesBuiltin(text: string): Set<string> {
  return new Set(text.split("\n").filter(Boolean).map(moduleName));
}
