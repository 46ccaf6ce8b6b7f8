/**
 * 16550A UART (the PC's COM ports). A pure state machine: output bytes and the
 * interrupt line go to injected callbacks; input arrives through `enqueueInput`.
 * Register map: PC16550D datasheet; loopback behaviour as Linux's 8250 probe expects.
 */

/** What the UART drives. */
export interface SerialSink {
  /** A byte the guest transmitted. */
  output(byte: number): void;
  /** The interrupt line (level: true while an interrupt is pending). */
  setIrq(level: boolean): void;
}

const DATA = 0; // RBR/THR, DLL when DLAB
const IER = 1; // DLM when DLAB
const IIR_FCR = 2;
const LCR = 3;
const MCR = 4;
const LSR = 5;
const MSR = 6;
const SCR = 7;

const IER_RDA = 0x01;
const IER_THRE = 0x02;
const IIR_NONE = 0x01;
const IIR_THRE = 0x02;
const IIR_RDA = 0x04;
const IIR_FIFO_ENABLED = 0xc0;
const LCR_DLAB = 0x80;
const LSR_DR = 0x01;
const LSR_THRE = 0x20;
const LSR_TEMT = 0x40;
const MCR_LOOP = 0x10;
const MSR_CTS = 0x10;
const MSR_DSR = 0x20;
const MSR_DCD = 0x80;

/** Receive FIFO depth of a 16550A. */
export const RX_FIFO_SIZE = 64;

/** A 16550A UART. */
export class Serial {
  private ier = 0;
  private lcr = 0x03; // 8N1
  private mcr = 0x08; // OUT2
  private scr = 0;
  private dll = 0x0c; // 9600 baud
  private dlm = 0;
  private fcr = 0;
  private threPending = false;
  private irqLevel = false;
  private readonly rx: number[] = [];

  /** A UART that drives `sink`. */
  constructor(private readonly sink: SerialSink) {}

  /** Room left in the receive FIFO. */
  get rxRoom(): number {
    return RX_FIFO_SIZE - this.rx.length;
  }

  /** Queues host input for the guest; returns how many bytes fitted in the FIFO. */
  enqueueInput(bytes: Uint8Array): number {
    const n = Math.min(bytes.length, this.rxRoom);
    for (let i = 0; i < n; i++) this.rx.push(bytes[i]);
    if (n > 0) this.updateIrq();
    return n;
  }

  private updateIrq(): void {
    const level = this.pendingIir() !== IIR_NONE;
    if (level !== this.irqLevel) {
      this.irqLevel = level;
      this.sink.setIrq(level);
    }
  }

  private pendingIir(): number {
    if ((this.ier & IER_RDA) && this.rx.length > 0) return IIR_RDA;
    if ((this.ier & IER_THRE) && this.threPending) return IIR_THRE;
    return IIR_NONE;
  }

  /** Reads one register (the UART is byte-wide; wider reads see the low byte). */
  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    data[0] = this.readReg(offset);
  }

  /** Writes one register. */
  write(offset: number, data: Uint8Array): void {
    this.writeReg(offset, data[0]);
  }

  private readReg(off: number): number {
    const dlab = (this.lcr & LCR_DLAB) !== 0;
    switch (off) {
      case DATA: {
        if (dlab) return this.dll;
        const b = this.rx.shift() ?? 0;
        this.updateIrq();
        return b;
      }
      case IER:
        return dlab ? this.dlm : this.ier;
      case IIR_FCR: {
        const iir = this.pendingIir();
        // Reading IIR acknowledges a THRE interrupt (16550 datasheet, table 4).
        if (iir === IIR_THRE) {
          this.threPending = false;
          this.updateIrq();
        }
        return iir | ((this.fcr & 1) ? IIR_FIFO_ENABLED : 0);
      }
      case LCR:
        return this.lcr;
      case MCR:
        return this.mcr;
      case LSR:
        return LSR_THRE | LSR_TEMT | (this.rx.length > 0 ? LSR_DR : 0);
      case MSR:
        if (this.mcr & MCR_LOOP) {
          // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
          return ((this.mcr & 0x01) << 5) | ((this.mcr & 0x02) << 3) | ((this.mcr & 0x04) << 4) |
            ((this.mcr & 0x08) << 4);
        }
        return MSR_DCD | MSR_DSR | MSR_CTS;
      case SCR:
        return this.scr;
      default:
        return 0;
    }
  }

  private writeReg(off: number, v: number): void {
    const dlab = (this.lcr & LCR_DLAB) !== 0;
    switch (off) {
      case DATA:
        if (dlab) {
          this.dll = v;
          return;
        }
        if (this.mcr & MCR_LOOP) {
          if (this.rx.length < RX_FIFO_SIZE) this.rx.push(v);
        } else {
          this.sink.output(v);
        }
        // The byte leaves at once, so the holding register is empty again.
        this.threPending = true;
        this.updateIrq();
        return;
      case IER:
        if (dlab) {
          this.dlm = v;
          return;
        }
        // Enabling THRE with an empty holding register raises the interrupt at once.
        if ((v & IER_THRE) && !(this.ier & IER_THRE)) this.threPending = true;
        this.ier = v & 0x0f;
        this.updateIrq();
        return;
      case IIR_FCR:
        this.fcr = v;
        if (v & 0x02) this.rx.length = 0; // clear receive FIFO
        this.updateIrq();
        return;
      case LCR:
        this.lcr = v;
        return;
      case MCR:
        this.mcr = v & 0x1f;
        return;
      case SCR:
        this.scr = v;
        return;
    }
  }
}
