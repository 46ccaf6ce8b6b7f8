/**
 * The device side of the ISR-line race in tiny_guest_cases.ts. Round r starts when
 * `control[0]` reaches r: it sets the used-ring bit and, whenever the bit found the ISR
 * zero, raises the line (followIsr) as the device thread does, until it has raised it
 * `raises` times; then it sets `control[1]` to r.
 */

/// <reference lib="deno.worker" />

import { followIsr } from "../../vmm/isr_line.ts";

interface Job {
  buffer: SharedArrayBuffer;
  index: number;
  vmFd: number;
  gsi: number;
  rounds: number;
  raises: number;
  control: SharedArrayBuffer;
}

self.onmessage = (e: MessageEvent<Job>) => {
  const { buffer, index, vmFd, gsi, rounds, raises } = e.data;
  const w = new Int32Array(buffer);
  const control = new Int32Array(e.data.control);
  for (let r = 1; r <= rounds; r++) {
    while (Atomics.load(control, 0) < r) Atomics.wait(control, 0, r - 1, 1000);
    let raised = 0;
    while (raised < raises) {
      if (Atomics.or(w, index, 1) === 0) {
        followIsr(vmFd, gsi, w, index);
        raised++;
      }
    }
    Atomics.store(control, 1, r);
  }
  self.postMessage("done");
};
