/**
 * One-line descriptions of interrupt-controller and vCPU state for hung-guest reports:
 * where each vCPU is and whether it can take interrupts, which vectors its LAPIC has
 * pending (IRR) or in service (ISR), and each live IOAPIC pin (vector, trigger, remote IRR).
 * Pure functions over the KVM structs, so they are tested without KVM.
 */

const MP_STATES = ["runnable", "uninitialized", "init-received", "halted", "sipi-received"];

/** Vectors set in a 256-bit LAPIC register (8 words, 16 bytes apart) at `off`. */
export function lapicVectors(lapic: Uint8Array, off: number): number[] {
  const dv = new DataView(lapic.buffer, lapic.byteOffset, lapic.byteLength);
  const out: number[] = [];
  for (let w = 0; w < 8; w++) {
    const v = dv.getUint32(off + w * 16, true);
    for (let b = 0; b < 32; b++) if (v & (1 << b)) out.push(w * 32 + b);
  }
  return out;
}

const hex = (v: number | bigint) => `0x${v.toString(16)}`;
const list = (xs: number[]) => `[${xs.map(hex).join(",")}]`;

/** What a vCPU is doing: RIP, IF, MP state, injected event, LAPIC IRR/ISR/TMR, TPR and timer. */
export function describeVcpu(
  index: number,
  s: { rip: bigint; rflags: bigint; mpState: number; lapic: Uint8Array; events: Uint8Array },
): string {
  const l = new DataView(s.lapic.buffer, s.lapic.byteOffset, s.lapic.byteLength);
  const ev = s.events;
  // struct kvm_vcpu_events: exception (8 bytes), then interrupt { injected, nr, soft, shadow }.
  // interrupt.shadow: STI / MOV SS blocking (1 and 2), which holds interrupts back for one instruction.
  const injected = (ev[8] ? ` injecting=${hex(ev[9])}` : "") + (ev[11] ? ` shadow=${ev[11]}` : "") +
    (ev[0] ? ` exception=${hex(ev[1])}` : "") + (ev[12] ? " nmi" : "");
  return `vCPU ${index}: rip=${hex(s.rip)} IF=${(s.rflags >> 9n) & 1n} ${MP_STATES[s.mpState] ?? s.mpState}` +
    `${injected} lapic irr=${list(lapicVectors(s.lapic, 0x200))} isr=${list(lapicVectors(s.lapic, 0x100))}` +
    ` tmr=${list(lapicVectors(s.lapic, 0x180))} tpr=${hex(l.getUint32(0x80, true))}` +
    ` lvt-timer=${hex(l.getUint32(0x320, true))} tmict=${l.getUint32(0x380, true)}`;
}

/**
 * The IOAPIC's IRR from its KVM_GET_IRQCHIP state (VmFd.getIrqchip(2)): bit N set while pin
 * N's line is asserted.
 */
export function ioapicIrr(state: Uint8Array): number {
  return new DataView(state.buffer, state.byteOffset, state.byteLength).getUint32(16, true);
}

/** The IOAPIC's unmasked or pending pins from struct kvm_ioapic_state. */
export function describeIoapic(state: Uint8Array): string {
  const dv = new DataView(state.buffer, state.byteOffset, state.byteLength);
  const irr = ioapicIrr(state);
  const pins: string[] = [];
  for (let pin = 0; pin < 24; pin++) {
    const e = dv.getBigUint64(24 + pin * 8, true);
    const masked = (e >> 16n) & 1n;
    const remoteIrr = (e >> 14n) & 1n;
    const level = (e >> 15n) & 1n;
    const line = (irr >> pin) & 1;
    if (masked && !remoteIrr && !line) continue;
    pins.push(
      `${pin}:${hex(Number(e & 0xffn))}/${level ? "level" : "edge"}` +
        `${masked ? "/masked" : ""}${remoteIrr ? "/remote-irr" : ""}${line ? "/asserted" : ""}`,
    );
  }
  return `ioapic: ${pins.length ? pins.join(" ") : "no live pins"}`;
}
