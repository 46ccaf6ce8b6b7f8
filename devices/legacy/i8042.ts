/**
 * i8042 keyboard controller, enough for what a guest does with it on a VM: the
 * command/status protocol Linux's i8042 driver probes, and CPU reset (command 0xfe).
 * Polled status reads answer "input buffer empty", so a spinning guest moves on.
 */

/** What the controller drives. */
export interface I8042Sink {
  /** The guest pulsed the reset line. */
  reset(): void;
  /** Keyboard interrupt (edge). */
  interrupt(): void;
}

const STATUS_OBF = 0x01;
const STATUS_SYS = 0x04;
const STATUS_CMD = 0x08;
// Keyboard lock ("inhibit") switch, active low: 1 = unlocked. Linux's i8042 driver prints
// "Warning: Keylock active" and ignores the keyboard when it reads 0.
const STATUS_KEYLOCK_OFF = 0x10;
const CTR_KBD_INT = 0x01;

/** Offsets relative to port 0x60: data at 0, command/status at 4. */
export const I8042_DATA = 0;
/** Command/status register offset. */
export const I8042_CMD = 4;

/** An i8042 controller with a keyboard that acknowledges commands and sends nothing. */
export class I8042 {
  private ctr = 0x47 & ~CTR_KBD_INT; // translate, system flag, interrupts off until the driver asks
  private status = STATUS_SYS | STATUS_KEYLOCK_OFF;
  private readonly out: number[] = [];
  private pendingCmd = 0;

  /** A controller that drives `sink`. */
  constructor(private readonly sink: I8042Sink) {}

  private push(...bytes: number[]): void {
    this.out.push(...bytes);
    if (this.ctr & CTR_KBD_INT) this.sink.interrupt();
  }

  /** Reads the data port (offset 0) or the status register (offset 4). */
  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (offset === I8042_DATA) {
      data[0] = this.out.shift() ?? 0;
    } else if (offset === I8042_CMD) {
      data[0] = this.status | (this.out.length ? STATUS_OBF : 0);
    }
  }

  /** Writes the data port or a controller command. */
  write(offset: number, data: Uint8Array): void {
    const v = data[0];
    if (offset === I8042_CMD) {
      this.status |= STATUS_CMD;
      this.pendingCmd = 0;
      switch (v) {
        case 0x20: // read CTR
          this.push(this.ctr);
          break;
        case 0x60: // write CTR: next data byte
        case 0xd1: // write output port: next data byte
        case 0xd2: // write keyboard output buffer
          this.pendingCmd = v;
          break;
        case 0xaa: // controller self-test
          this.push(0x55);
          break;
        case 0xab: // keyboard interface test
          this.push(0x00);
          break;
        case 0xd0: // read output port: A20 on, reset line high
          this.push(0x03);
          break;
        case 0xfe: // pulse reset line
          this.sink.reset();
          break;
        default: // 0xad/0xae/0xa7/0xa8 and others: accepted, no reply
          break;
      }
      return;
    }
    if (offset !== I8042_DATA) return;
    this.status &= ~STATUS_CMD;
    const cmd = this.pendingCmd;
    this.pendingCmd = 0;
    if (cmd === 0x60) {
      this.ctr = v;
    } else if (cmd === 0xd1) {
      if ((v & 1) === 0) this.sink.reset();
    } else if (cmd === 0xd2) {
      this.push(v);
    } else if (v === 0xff) {
      this.push(0xfa, 0xaa); // keyboard reset: ack, self-test passed
    } else if (v === 0xf2) {
      this.push(0xfa, 0xab, 0x83); // identify: MF2 keyboard
    } else {
      this.push(0xfa); // ack any other keyboard command
    }
  }
}
