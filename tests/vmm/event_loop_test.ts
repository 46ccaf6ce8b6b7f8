/**
 * The epoll loop (vmm/event_loop.ts) as the device thread runs it: blocking in epoll_wait on
 * its own thread only when nothing else is pending there.
 */

import assert from "node:assert/strict";
import { drainEventfd, EventLoop } from "../../vmm/event_loop.ts";
import { sysClose, sysEventfd } from "../../vmm/sys/libc.ts";

Deno.test("event loop: a flush that left work to continuations makes the loop turn before it decides to block", async () => {
  const log: string[] = [];
  // Calls the continuations start (as the pool calls replacing refused ring operations do):
  // while any is in flight the loop must not block this thread.
  let calls = 0;
  let refuse = true;
  const loop = new EventLoop({
    // Records what the loop knew when it decided; never lets it block this thread (a loop
    // that decided too early would otherwise hang the test instead of failing it).
    canBlock: () => {
      log.push(`canBlock(calls=${calls})`);
      return false;
    },
    settled: () => true,
  });
  const wake = sysEventfd();
  loop.add(wake, () => void drainEventfd(wake));
  loop.addFlush(() => {
    if (!refuse) return false;
    refuse = false;
    // What the flush refused is made another way, in a promise continuation.
    void Promise.resolve().then(() => {
      calls++;
      log.push("continuation");
    });
    return true;
  });
  loop.start();
  for (let i = 0; i < 100 && log.length < 2; i++) await new Promise((r) => setTimeout(r, 5));
  await loop.stop();
  sysClose(wake);
  assert.deepEqual(log.slice(0, 2), ["continuation", "canBlock(calls=1)"]);
});
