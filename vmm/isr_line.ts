/**
 * A level-triggered interrupt line that follows an InterruptStatus cell: asserted while the
 * cell is not zero, driven with KVM_IRQ_LINE by whichever thread changed the cell (the
 * device thread setting a bit, a vCPU thread answering the driver's InterruptACK, the main
 * thread on a config change or reset). This is virtio-MMIO's line.
 *
 * It replaces an irqfd with a resample eventfd, which cost two thread wake-ups per interrupt
 * on a line routed to the IOAPIC: KVM injects such an irqfd from a kworker (only MSI routes
 * are injected in the writer's context), and the guest's EOI signals the resample eventfd,
 * which woke the device thread to check the ISR again. Measured inside the nested runner
 * (docs/PERFORMANCE.md): that kworker hop and the extra wake-up were most of a
 * virtio-MMIO request's time there.
 *
 * Threads change the cell with atomics and then call `followIsr`, which sets the line to
 * the cell's state and checks that the cell still agrees, setting it again if not. Two
 * threads may set the line in either order; the one whose check fails sets it again, so the
 * last setting always matches the cell as it stands once both are done, and an InterruptACK
 * racing a new used buffer can neither drop the line while a bit is set nor leave it up
 * with none. Only a change between zero and not zero needs the call.
 */

import { VmFd } from "./vm.ts";

// The VM's KVM_IRQ_LINE (VmFd.irqLine and its buffer), made once per thread: each Worker
// has only the fd number.
let vm: VmFd | undefined;

/** A line for followIsr: the VM's fd (KVM_IRQ_LINE is a VM ioctl) and the GSI. */
export interface IsrLine {
  /** The VM descriptor. */
  vmFd: number;
  /** The GSI (an IOAPIC pin, level-triggered in the DSDT). */
  gsi: number;
}

/**
 * Sets GSI `gsi` of VM `vmFd` to whether the cell `words[index]` is non-zero, until the two
 * agree.
 */
export function followIsr(vmFd: number, gsi: number, words: Int32Array, index: number): void {
  if (vm?.fd !== vmFd) vm = new VmFd(vmFd);
  let up = Atomics.load(words, index) !== 0;
  for (;;) {
    vm.irqLine(gsi, up);
    const now = Atomics.load(words, index) !== 0;
    if (now === up) return;
    up = now;
  }
}
