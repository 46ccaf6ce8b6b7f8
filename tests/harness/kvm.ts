/** Test gates: whether this machine's /dev/kvm can serve a test. */

let warned = new Set<string>();

/** True if /dev/kvm can be opened read-write; otherwise prints a loud reason once per suite. */
export function requireKvm(what: string): boolean {
  try {
    Deno.openSync("/dev/kvm", { read: true, write: true }).close();
    return true;
  } catch (e) {
    if (!warned.has(what)) {
      console.error(`SKIPPED ${what}: /dev/kvm is not usable here (${(e as Error).message})`);
      warned = new Set([...warned, what]);
    }
    return false;
  }
}
