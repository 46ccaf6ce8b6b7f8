/** The storage behind a virtio-blk device. The VMM's implementation is a raw image file. */

/** Byte-addressed block storage with asynchronous I/O. Errors reject (answered IOERR). */
export interface BlockBackend {
  /** Size in bytes. */
  readonly size: number;
  /** Whether writes are refused. */
  readonly readonly: boolean;
  /** A stable identifier for the serial when none is configured (e.g. the image path). */
  readonly identity: string;
  /** Reads into `bufs` from byte `offset`. */
  read(bufs: Uint8Array[], offset: number): Promise<void>;
  /** Writes `bufs` at byte `offset`. */
  write(bufs: Uint8Array[], offset: number): Promise<void>;
  /**
   * Optional: moves the whole of `bufs` from or to byte `offset` before returning, if that
   * needs no wait for a device (page cache, a memory file system). True: the transfer is
   * complete. False: it must go through `read` or `write`; part of it may have moved already,
   * which the full transfer then moves again (the same bytes to the same place).
   */
  transferNow?(write: boolean, bufs: Uint8Array[], offset: number): boolean;
  /** Makes written data durable. */
  flush(): Promise<void>;
  /** Deallocates a range (reads return zeros afterwards). */
  discard(offset: number, len: number): Promise<void>;
  /** Zeroes a range; `unmap` allows deallocating it. */
  writeZeroes(offset: number, len: number, unmap: boolean): Promise<void>;
  /** Releases the storage once every call in flight has settled; new calls are refused. */
  close(): Promise<void>;
  /** Backend state for failure reports and the bench (optional). */
  describe?(): string;
}
