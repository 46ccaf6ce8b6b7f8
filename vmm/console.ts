/**
 * The serial console's host side: guest output fanned out to stdout and/or a stream,
 * with a bounded tail kept for error messages; host input queued (bounded) into the UART.
 */

const TAIL_BYTES = 16 * 1024;
const MAX_PENDING_INPUT = 64 * 1024;

/** Host side of a serial console. */
export class ConsoleHub {
  private buf: number[] = [];
  private flushScheduled = false;
  private tail = new Uint8Array(0);
  private listeners = new Set<(chunk: Uint8Array) => void>();
  private pendingInput: number[] = [];
  private deliver: ((b: Uint8Array) => number) | undefined;

  /** A hub that also writes to stdout when `stdout` is set. */
  constructor(private readonly stdout: boolean) {}

  /** Called by the UART for each transmitted byte. */
  outputByte(b: number): void {
    this.buf.push(b);
    if (b === 0x0a || this.buf.length >= 4096) this.flush();
    else if (!this.flushScheduled) {
      this.flushScheduled = true;
      setTimeout(() => this.flush(), 5);
    }
  }

  /** Pushes buffered output to stdout and listeners. */
  flush(): void {
    this.flushScheduled = false;
    if (this.buf.length === 0) return;
    const chunk = new Uint8Array(this.buf);
    this.buf = [];
    if (this.stdout) {
      let off = 0;
      while (off < chunk.length) off += Deno.stdout.writeSync(chunk.subarray(off));
    }
    const t = new Uint8Array(Math.min(TAIL_BYTES, this.tail.length + chunk.length));
    const keep = t.length - chunk.length;
    if (keep > 0) t.set(this.tail.subarray(this.tail.length - keep));
    t.set(chunk.subarray(Math.max(0, chunk.length - t.length)), Math.max(0, keep));
    this.tail = t;
    for (const l of this.listeners) l(chunk);
  }

  /** The last few KiB of output, as text. */
  tailText(): string {
    return new TextDecoder().decode(this.tail);
  }

  /** Subscribes to output chunks; returns the unsubscribe function. */
  onOutput(fn: (chunk: Uint8Array) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Connects the UART's input side: `deliver` returns how many bytes it took. */
  attachInput(deliver: (b: Uint8Array) => number): void {
    this.deliver = deliver;
  }

  /** Queues input for the guest; false if the queue is full (the caller should wait). */
  input(bytes: Uint8Array): boolean {
    if (this.pendingInput.length + bytes.length > MAX_PENDING_INPUT) return false;
    for (const b of bytes) this.pendingInput.push(b);
    this.drainInput();
    return true;
  }

  /** Moves queued input into the UART as it makes room. */
  drainInput(): void {
    if (!this.deliver || this.pendingInput.length === 0) return;
    const n = this.deliver(new Uint8Array(this.pendingInput.slice(0, 64)));
    if (n > 0) this.pendingInput.splice(0, n);
  }
}
