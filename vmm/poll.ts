/**
 * A bounded, self-tuning busy-poll window for the vCPU mailbox handoff, on the rule of
 * KVM's halt polling: polling pays only when the other side answers soon, so the window
 * grows when a wait ended just after the window closed (a wake-up that polling a little
 * longer would have saved) and shrinks when a wait was long (nothing was coming soon).
 * It never exceeds `maxUs`, and a wait that polling caught leaves it as it is.
 *
 * Polling counts loads instead of reading the clock: a clock read is cheap on a host
 * (tens of ns) but costs about 7 us inside the nested runner's L1, whose clock source is
 * the HPET. The loads per microsecond are measured once per thread (`calibrate`); only a
 * wait that polling did not catch reads the clock, and that wait is slow anyway.
 */
export class PollWindow {
  /** The current window in microseconds (0 = sleep at once). */
  us: number;

  /**
   * A window that starts at `startUs`, grows from at least `stepUs` by doubling, and stays
   * within [0, `maxUs`].
   */
  constructor(readonly maxUs: number, readonly startUs: number = 0, readonly stepUs: number = 10) {
    this.us = Math.min(startUs, maxUs);
  }

  /** The shortest sleep seen, slowly forgotten: what a wake-up itself costs, at most. */
  private wakeUs = Infinity;

  /** Tells the window how long (us) the last wait lasted in all, polling included. */
  waited(us: number): void {
    if (us <= this.us) return; // polling caught it
    if (us <= this.maxUs) this.us = Math.min(this.maxUs, Math.max(this.stepUs, this.us * 2));
    else this.us = this.us < this.stepUs ? 0 : this.us / 2;
  }

  /**
   * Tells the window that polling did not catch the last wait: it polled the whole window,
   * then slept `sleptUs` until woken. A wake-up's own latency (where it is slow, as in the
   * nested runner's L1, longer than the bound) is taken off before judging how soon the
   * other side came, so a slow wake-up does not stop polling for good.
   */
  slept(sleptUs: number): void {
    this.wakeUs = sleptUs < this.wakeUs ? sleptUs : this.wakeUs + (sleptUs - this.wakeUs) / 64;
    this.waited(Math.max(this.us + sleptUs - this.wakeUs, this.us + 0.001));
  }
}

let loadsPerUs = 0;

/** Loads per microsecond of the polling loop on this thread (measured on first use). */
export function calibrate(): number {
  if (loadsPerUs > 0) return loadsPerUs;
  const word = new Int32Array(new SharedArrayBuffer(4));
  let best = 0;
  // The best of three: a run the scheduler interrupted reads low.
  for (let round = 0; round < 3; round++) {
    const n = 20_000;
    const t0 = performance.now();
    spin(word, 0, 0, n); // nobody writes the word: runs all n loads
    const us = (performance.now() - t0) * 1000;
    best = Math.max(best, us > 0 ? n / us : n);
  }
  loadsPerUs = Math.max(best, 0.01);
  return loadsPerUs;
}

function spin(word: Int32Array, index: number, value: number, loads: number): boolean {
  for (let i = 0; i < loads; i++) if (Atomics.load(word, index) !== value) return true;
  return false;
}

/**
 * Polls `word[index]` until it differs from `value` or `window.us` has passed; true if it
 * changed.
 */
export function pollWhile(word: Int32Array, index: number, value: number, window: PollWindow): boolean {
  if (window.us <= 0) return Atomics.load(word, index) !== value;
  return spin(word, index, value, Math.ceil(window.us * calibrate()));
}
