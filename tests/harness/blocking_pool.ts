/**
 * Fills Deno's blocking pool (where nonblocking FFI calls run) with reads parked on an
 * empty pipe, so calls made after it queue instead of running at once. Used to reproduce
 * what a busy VMM sees: calls that outlive the code that made them.
 */

import { pinnedCall } from "../../vmm/sys/libc.ts";

/** Parked reads; `release()` lets them all finish. */
export interface ParkedPool {
  /** Unblocks every parked read and waits for them. */
  release(): Promise<void>;
}

/** Parks `n` blocking reads (600 is more than the pool's threads). */
export function parkBlockingPool(n = 600): ParkedPool {
  const lib = Deno.dlopen("libc.so.6", {
    pipe: { parameters: ["buffer"], result: "i32" },
    read_nb: { name: "read", parameters: ["i32", "buffer", "usize"], result: "isize", nonblocking: true },
    write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
    close: { parameters: ["i32"], result: "i32" },
  });
  const fds = new Int32Array(2);
  if (lib.symbols.pipe(fds) !== 0) throw new Error("pipe failed");
  const buf = new Uint8Array(n);
  const parked: Promise<unknown>[] = [];
  for (let i = 0; i < n; i++) {
    const one = buf.subarray(i, i + 1);
    parked.push(pinnedCall([one], () => lib.symbols.read_nb(fds[0], one, 1n)));
  }
  return {
    release: async () => {
      lib.symbols.write(fds[1], new Uint8Array(n).fill(1), BigInt(n));
      await Promise.all(parked);
      lib.symbols.close(fds[0]);
      lib.symbols.close(fds[1]);
      lib.close();
    },
  };
}
