/**
 * The one FFI boundary to libc. Every other module reaches the host through
 * the typed wrappers here; raw pointers and bigint stay inside vmm/.
 *
 * Each Worker (vCPU thread) loads its own copy, because a Deno.dlopen handle
 * cannot cross isolates.
 */

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  dup3: { parameters: ["i32", "i32", "i32"], result: "i32" },
  ioctl: { name: "ioctl", parameters: ["i32", "u64", "buffer"], result: "i32" },
  ioctl_val: { name: "ioctl", parameters: ["i32", "u64", "u64"], result: "i32" },
  mmap: {
    parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"],
    result: "pointer",
  },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  madvise: { parameters: ["pointer", "usize", "i32"], result: "i32" },
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
  strerror: { parameters: ["i32"], result: "pointer" },
  gettid: { parameters: [], result: "i32" },
  setpriority: { parameters: ["i32", "u32", "i32"], result: "i32" },
  sched_setaffinity: { parameters: ["i32", "usize", "buffer"], result: "i32" },
  sched_getaffinity: { parameters: ["i32", "usize", "buffer"], result: "i32" },
  getpid: { parameters: [], result: "i32" },
  tgkill: { parameters: ["i32", "i32", "i32"], result: "i32" },
  dlsym: { parameters: ["pointer", "buffer"], result: "pointer" },
  flock: { parameters: ["i32", "i32"], result: "i32" },
  epoll_create1: { parameters: ["i32"], result: "i32" },
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  // Eventfd counters: 8 bytes from or to a buffer the caller keeps (no pointer object).
  read_buf: { name: "read", parameters: ["i32", "buffer", "usize"], result: "isize" },
  write_buf: { name: "write", parameters: ["i32", "buffer", "usize"], result: "isize" },
  readv: { parameters: ["i32", "pointer", "i32"], result: "isize" },
  writev: { parameters: ["i32", "pointer", "i32"], result: "isize" },
  fcntl: { parameters: ["i32", "i32", "i64"], result: "i32" },
  if_nametoindex: { parameters: ["buffer"], result: "u32" },
  // Synchronous, with RWF_NOWAIT: served from the page cache or refused with EAGAIN, never waits.
  preadv2: { parameters: ["i32", "pointer", "i32", "i64", "i32"], result: "isize" },
  pwritev2: { parameters: ["i32", "pointer", "i32", "i64", "i32"], result: "isize" },
  preadv: { parameters: ["i32", "pointer", "i32", "i64"], result: "isize" },
  pwritev: { parameters: ["i32", "pointer", "i32", "i64"], result: "isize" },
  fdatasync: { parameters: ["i32"], result: "i32" },
  fstatfs: { parameters: ["i32", "buffer"], result: "i32" },
  // Blocking calls run off the main thread (Deno's blocking pool); they return promises.
  preadv_nb: {
    name: "preadv",
    parameters: ["i32", "pointer", "i32", "i64"],
    result: "isize",
    nonblocking: true,
  },
  pwritev_nb: {
    name: "pwritev",
    parameters: ["i32", "pointer", "i32", "i64"],
    result: "isize",
    nonblocking: true,
  },
  fdatasync_nb: { name: "fdatasync", parameters: ["i32"], result: "i32", nonblocking: true },
  fallocate_nb: {
    name: "fallocate",
    parameters: ["i32", "i32", "i64", "i64"],
    result: "i32",
    nonblocking: true,
  },
  epoll_wait: { parameters: ["i32", "pointer", "i32", "i32"], result: "i32" },
  epoll_wait_nb: {
    name: "epoll_wait",
    parameters: ["i32", "pointer", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },
  signal: { parameters: ["i32", "pointer"], result: "pointer" },
} as const;

type Libc = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let lib: Libc | undefined;

/** The libc symbols, loaded on first use in this isolate. */
export function libc(): Libc {
  if (!lib) {
    lib = Deno.dlopen("libc.so.6", SYMBOLS).symbols;
    errnoView = new Deno.UnsafePointerView(lib.__errno_location()!);
  }
  return lib;
}

/**
 * Buffers whose addresses a nonblocking FFI call is using. A pointer taken with
 * `Deno.UnsafePointer.of` does not keep its buffer alive: once the JS code that made it
 * is optimized, nothing may reference the buffer across the `await`, and the garbage
 * collector can free it while the call still waits on (or runs in) Deno's blocking pool.
 * Every nonblocking call that is handed memory by address goes through `pinnedCall`.
 */
const pinned = new Set<{ readonly buffers: readonly object[] }>();

/**
 * Runs `call` (a nonblocking FFI call given addresses inside `buffers`) and keeps every
 * one of `buffers` referenced until its promise settles, whatever the optimizer does.
 */
export async function pinnedCall<T>(buffers: readonly object[], call: () => Promise<T>): Promise<T> {
  const hold = { buffers };
  pinned.add(hold);
  try {
    return await call();
  } finally {
    pinned.delete(hold);
  }
}

/**
 * How many nonblocking calls made through `pinnedCall` are in flight (every one on Deno's
 * blocking pool is: the device thread blocks in epoll_wait only when this is 0).
 */
export function pinnedCalls(): number {
  return pinned.size;
}

/** errno names for the values a VMM meets; others print as their number. */
const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  2: "ENOENT",
  4: "EINTR",
  5: "EIO",
  9: "EBADF",
  11: "EAGAIN",
  12: "ENOMEM",
  13: "EACCES",
  14: "EFAULT",
  16: "EBUSY",
  17: "EEXIST",
  19: "ENODEV",
  22: "EINVAL",
  24: "EMFILE",
  25: "ENOTTY",
  28: "ENOSPC",
  38: "ENOSYS",
  95: "EOPNOTSUPP",
};

/**
 * This thread's errno, as a view made once per isolate (each Worker is a thread of its own
 * with its own copy of this module): reading it is then a plain load, with no FFI call and
 * no allocation between the failed call and the read (it is made when libc is loaded, so
 * before any call that can fail). A call into `__errno_location` at
 * read time could itself run code that sets errno (an FFI call's slow path, a garbage
 * collection), and a CLI run under load once reported a flock that failed as ENOENT.
 */
let errnoView: Deno.UnsafePointerView | undefined;

/** errno of the last failed call on this thread; read it right after the call. */
export function errno(): number {
  if (!errnoView) libc();
  return errnoView!.getInt32();
}

/** The symbolic name of an errno value, e.g. "EINVAL". */
export function errnoName(e: number): string {
  return ERRNO_NAMES[e] ?? `errno ${e}`;
}

/** The C library's message for an errno value. */
export function strerror(e: number): string {
  const p = libc().strerror(e);
  return p ? Deno.UnsafePointerView.getCString(p) : `errno ${e}`;
}

/** A failed system call: names the call and the errno. */
export class SysError extends Error {
  /** The errno value. */
  readonly errno: number;
  /** Builds the error for `call` failing with `e`. */
  constructor(call: string, e: number) {
    super(`${call} failed: ${errnoName(e)} (${strerror(e)})`);
    this.name = "SysError";
    this.errno = e;
  }
}

const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_NORESERVE = 0x4000;
const MADV_HUGEPAGE = 14;
const MAP_FAILED = -1n;

/** Opens `path` with `flags`; throws SysError on failure. */
export function sysOpen(path: string, flags: number): number {
  const fd = libc().open(new TextEncoder().encode(path + "\0"), flags, 0);
  if (fd < 0) throw new SysError(`open ${path}`, errno());
  return fd;
}

/**
 * Gives up an fd whose number calls still in flight on another thread may use (Deno's
 * blocking pool of a device thread that died): the number is made to name /dev/null instead
 * of closed, so a late call on it reads nothing and writes nowhere, and no file opened later
 * can get that number. What the fd named is released as a close would (its lock too, once
 * no call holds the file). Returns false if that could not be done (the fd is left open).
 */
export function sysRetireFd(fd: number): boolean {
  let nul: number;
  try {
    nul = sysOpen("/dev/null", O_RDWR | O_CLOEXEC);
  } catch {
    return false;
  }
  const ok = libc().dup3(nul, fd, O_CLOEXEC) === fd;
  sysClose(nul);
  return ok;
}

const O_RDWR = 2;
const O_CLOEXEC = 0o2000000;

/** Closes a file descriptor, ignoring errors (used on teardown). */
export function sysClose(fd: number): void {
  libc().close(fd);
}

/** Throws SysError naming `what` if mmap returned MAP_FAILED. */
function checkMapped(p: Deno.PointerValue, what: string): asserts p is Deno.PointerObject {
  if (p === null || Deno.UnsafePointer.value(p) === MAP_FAILED) throw new SysError(what, errno());
}

/** The huge page size guest RAM is aligned to (x86-64's 2 MiB). */
export const HUGE_PAGE = 2 << 20;

/**
 * Private anonymous memory for guest RAM, with transparent huge pages asked for, starting on
 * a 2 MiB boundary. KVM maps guest memory with huge pages only where the host address and
 * the guest address agree modulo the huge page size; a region at an address mmap happened
 * to choose (any 4 KiB boundary) would get 4 KiB pages only, and each first touch of guest
 * memory would fault separately. So a little more is mapped and the slack on both sides is
 * given back.
 */
export function mmapAnonymous(size: number): Deno.PointerObject {
  const total = size + HUGE_PAGE;
  const raw = libc().mmap(
    null,
    BigInt(total),
    PROT_READ | PROT_WRITE,
    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
    -1,
    0n,
  );
  checkMapped(raw, `mmap of ${size} bytes`);
  const at = Deno.UnsafePointer.value(raw) as bigint;
  const head = Number((BigInt(HUGE_PAGE) - at % BigInt(HUGE_PAGE)) % BigInt(HUGE_PAGE));
  if (head > 0) libc().munmap(raw, BigInt(head));
  const p = Deno.UnsafePointer.create(at + BigInt(head))!;
  const tail = total - head - size;
  if (tail > 0) libc().munmap(Deno.UnsafePointer.create(at + BigInt(head + size)), BigInt(tail));
  libc().madvise(p, BigInt(size), MADV_HUGEPAGE); // best effort
  return p;
}

/** Maps `size` bytes of a file descriptor shared from `offset` (e.g. a vCPU's kvm_run, an io_uring's rings). */
export function mmapShared(fd: number, size: number, offset = 0n): Deno.PointerObject {
  const p = libc().mmap(null, BigInt(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
  checkMapped(p, `mmap of fd ${fd}`);
  return p;
}

const PROT_NONE = 0;
const MAP_FIXED = 0x10;

/**
 * Gives up a mapping that a call still in flight may write into (guest RAM after its device
 * thread died): its memory is released, but its addresses stay reserved, inaccessible, until
 * the process exits, so such a call fails with EFAULT instead of landing in whatever mmap
 * would place there next. Returns false if the kernel refused (the mapping is then left as
 * it was, still readable and writable, and still reserved).
 */
export function reserveInPlace(p: Deno.PointerObject, size: number): boolean {
  const r = libc().mmap(
    p,
    BigInt(size),
    PROT_NONE,
    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
    -1,
    0n,
  );
  return r !== null && Deno.UnsafePointer.value(r) === Deno.UnsafePointer.value(p);
}

/** Unmaps a mapping made by the functions above. */
export function sysMunmap(p: Deno.PointerObject, size: number): void {
  libc().munmap(p, BigInt(size));
}

const EFD_CLOEXEC = 0o2000000;
const EFD_NONBLOCK = 0o4000;

/** A non-blocking eventfd. */
export function sysEventfd(): number {
  const fd = libc().eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) throw new SysError("eventfd", errno());
  return fd;
}

/** The calling thread's kernel id. */
export function sysGettid(): number {
  return libc().gettid();
}

/** The CPUs thread `tid` (0: the caller) may run on. */
export function sysGetAffinity(tid = 0): number[] {
  const mask = new Uint8Array(128);
  if (libc().sched_getaffinity(tid, BigInt(mask.length), mask) < 0) {
    throw new SysError(`sched_getaffinity(${tid})`, errno());
  }
  const cpus: number[] = [];
  for (let c = 0; c < mask.length * 8; c++) if (mask[c >> 3] & (1 << (c & 7))) cpus.push(c);
  return cpus;
}

const PRIO_PROCESS = 0;

/**
 * Sets the calling thread's nice value (Linux applies it per thread). Returns 0, or the errno
 * when refused: a negative value needs CAP_SYS_NICE (or a matching RLIMIT_NICE).
 */
export function sysSetThreadNice(nice: number): number {
  return libc().setpriority(PRIO_PROCESS, libc().gettid(), nice) === 0 ? 0 : errno();
}

/** Lets thread `tid` run only on `cpus`; throws on failure. */
export function sysSetAffinity(tid: number, cpus: readonly number[]): void {
  const mask = new Uint8Array(128); // cpu_set_t: 1024 CPUs
  for (const c of cpus) mask[c >> 3] |= 1 << (c & 7);
  if (libc().sched_setaffinity(tid, BigInt(mask.length), mask) !== 0) {
    throw new SysError(`sched_setaffinity(${tid})`, errno());
  }
}

/** Sends `sig` to thread `tid` of this process. */
export function sysTgkill(tid: number, sig: number): void {
  libc().tgkill(libc().getpid(), tid, sig);
}

const noopHandled = new Set<number>();

/**
 * Gives `sig` a handler that does nothing, once per process and never removed, so a
 * signal sent to a vCPU thread only interrupts KVM_RUN (EINTR). The handler is libc's
 * getpid (async-signal-safe, ignores its argument), found with dlsym.
 */
export function installNoopSignalHandler(sig: number): void {
  if (noopHandled.has(sig)) return;
  const fn = libc().dlsym(null, new TextEncoder().encode("getpid\0"));
  if (!fn) throw new Error("dlsym(getpid) failed");
  const prev = libc().signal(sig, fn);
  if (prev && Deno.UnsafePointer.value(prev) === -1n) throw new SysError(`signal(${sig})`, errno());
  noopHandled.add(sig);
}
