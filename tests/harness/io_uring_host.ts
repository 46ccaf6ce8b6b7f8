/**
 * Whether this host's kernel should give a process an io_uring, read from what the kernel
 * says about it rather than by opening one (the code under test): io_uring tests expect the
 * ring where nothing here forbids it, and the blocking pool's fallback where something does.
 */

/** Why this host refuses io_uring, or undefined when nothing forbids it. */
export function ioUringForbidden(): string | undefined {
  let disabled = "0";
  try {
    disabled = Deno.readTextFileSync("/proc/sys/kernel/io_uring_disabled").trim(); // Linux 6.6 and later
  } catch { /* older kernels have no switch: allowed */ }
  // 1 forbids it to unprivileged processes only, 2 to all.
  if (disabled === "2" || (disabled === "1" && Deno.uid() !== 0)) {
    return `kernel.io_uring_disabled=${disabled}`;
  }
  const seccomp = Deno.readTextFileSync("/proc/self/status").match(/^Seccomp:\s*(\d+)/m)?.[1] ?? "0";
  // A seccomp filter (Docker's default profile, say) may refuse the io_uring system calls.
  if (seccomp !== "0") return `a seccomp filter (mode ${seccomp})`;
  return undefined;
}
