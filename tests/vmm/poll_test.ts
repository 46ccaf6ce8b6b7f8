import { equal, ok } from "node:assert/strict";
import { calibrate, pollWhile, PollWindow } from "../../vmm/poll.ts";

Deno.test("poll window: grows after a wait it just missed, never past its bound, shrinks after long waits", () => {
  const w = new PollWindow(500, 0, 10);
  equal(w.us, 0);
  w.waited(30); // would have been caught by polling 30 us: grow from the step
  equal(w.us, 10);
  w.waited(8); // caught: unchanged
  equal(w.us, 10);
  for (let i = 0; i < 10; i++) w.waited(400);
  equal(w.us, 500, "doubling stops at the bound");
  w.waited(499);
  equal(w.us, 500);
  w.waited(5_000); // nothing was coming soon: halve
  equal(w.us, 250);
  for (let i = 0; i < 10; i++) w.waited(5_000);
  equal(w.us, 0, "a window below the step drops to no polling at all");
  equal(new PollWindow(50, 300).us, 50, "the start is bounded too");
});

Deno.test("pollWhile: sees a change made by another thread while polling, and gives up when none comes", async () => {
  ok(calibrate() > 0);
  const word = new Int32Array(new SharedArrayBuffer(4));
  const w = new PollWindow(20_000, 20_000);
  equal(pollWhile(word, 0, 0, new PollWindow(1000, 1000)), false, "nothing changed: bounded, then false");
  equal(pollWhile(word, 0, 1, new PollWindow(0)), true, "already different, even with no window");
  equal(pollWhile(word, 0, 0, new PollWindow(0)), false);
  // Another thread changes the word a few milliseconds into a 20 ms poll.
  const src = `self.onmessage = (e) => { const a = new Int32Array(e.data); ` +
    `const t = Date.now(); while (Date.now() - t < 3) {} Atomics.store(a, 0, 7); self.postMessage(1); };`;
  const worker = new Worker(URL.createObjectURL(new Blob([src], { type: "text/javascript" })), {
    type: "module",
  });
  const done = new Promise((r) => worker.onmessage = r);
  worker.postMessage(word.buffer);
  // Up to 20 polls of 20 ms each: the worker's start-up fits in that.
  let seen = false;
  for (let i = 0; i < 20 && !seen; i++) seen = pollWhile(word, 0, 0, w);
  await done;
  worker.terminate();
  ok(seen, "the change was seen by polling");
  equal(Atomics.load(word, 0), 7);
});

Deno.test("poll window: a slow wake-up is not counted against the other side", () => {
  // Wake-ups take 400 us here (more than the 100 us bound). One wait: the other side comes
  // `gap` us after the wait began; polling catches it if the window reaches that far.
  const w = new PollWindow(100, 0, 10);
  const wait = (gap: number) => gap <= w.us ? w.waited(gap) : w.slept(gap - w.us + 400);
  for (let i = 0; i < 10; i++) wait(40);
  equal(w.us, 40, "grew until polling covers the 40 us, then stayed");
  for (let i = 0; i < 10; i++) wait(70);
  equal(w.us, 80);
  // The other side now comes 2 ms after a wait began: polling does not pay, shrink to none.
  for (let i = 0; i < 10; i++) wait(2_000);
  equal(w.us, 0);
  // A burst again: polling comes back.
  for (let i = 0; i < 10; i++) wait(30);
  equal(w.us, 40);
});
