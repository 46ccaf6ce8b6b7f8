/**
 * loop_bench.ts's device-thread side: an EventLoop on this Worker that blocks in epoll_wait
 * (as vmm/device_worker.ts runs it); its handler stamps the time it ran and wakes the main
 * thread through shared memory.
 */

/// <reference lib="deno.worker" />

import { drainEventfd, EventLoop } from "../../vmm/event_loop.ts";
import { pinnedCalls } from "../../vmm/sys/libc.ts";

self.onmessage = (e: MessageEvent<{ sab: SharedArrayBuffer; fd: number }>) => {
  const { sab, fd } = e.data;
  const ctl = new Int32Array(sab, 0, 2);
  const stamp = new Float64Array(sab, 8, 1);
  const loop = new EventLoop({ canBlock: () => pinnedCalls() === 0 });
  loop.add(fd, () => {
    drainEventfd(fd);
    if (Atomics.load(ctl, 0) === 2) {
      // Told to stop: a Worker blocked in epoll_wait cannot be terminated from outside.
      void loop.stop();
      return;
    }
    stamp[0] = performance.timeOrigin + performance.now();
    Atomics.store(ctl, 1, 1);
    Atomics.notify(ctl, 1);
  });
  loop.start();
  Atomics.store(ctl, 0, 1);
  Atomics.notify(ctl, 0);
};
