/**
 * The hardware-reduced ACPI power registers (ACPI 6.4 section 4.8.3.7): the FADT's
 * sleep control and status registers and its reset register, in three I/O ports.
 */

/** What the power device drives. */
export interface AcpiPmSink {
  /** The guest entered S5 (soft off). */
  powerOff(): void;
  /** The guest wrote the reset value to the reset register. */
  reset(): void;
}

/** Offset of the sleep control register. */
export const SLEEP_CONTROL = 0;
/** Offset of the sleep status register. */
export const SLEEP_STATUS = 1;
/** Offset of the reset register. */
export const RESET = 2;

const SLP_EN = 0x20;
/** SLP_TYP for S5, matching the DSDT's _S5_ package. */
export const S5_SLP_TYP = 5;

/** Sleep control (SLP_TYPx in bits 2-4, SLP_EN bit 5), sleep status and reset. */
export class AcpiPm {
  /** A device that drives `sink`; `resetValue` is the FADT's RESET_VALUE. */
  constructor(private readonly sink: AcpiPmSink, private readonly resetValue: number) {}

  /** Registers read as zero (status: not woken). */
  read(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }

  /** Handles writes to the three registers. */
  write(offset: number, data: Uint8Array): void {
    const v = data[0];
    if (offset === SLEEP_CONTROL && (v & SLP_EN) && ((v >> 2) & 7) === S5_SLP_TYP) {
      this.sink.powerOff();
    } else if (offset === RESET && v === this.resetValue) {
      this.sink.reset();
    }
  }
}
