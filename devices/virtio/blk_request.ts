/**
 * Parsing a virtio-blk request (virtio 1.2 section 5.2.6): the 16-byte header from the
 * readable bytes, the data buffers, the status byte at the very end of the writable
 * bytes. Parsing only; blk.ts executes.
 */

import { type DescChain, gather, sliceBuffers } from "./chain.ts";

/** Request types. */
export const BLK_T = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  /** The legacy interface's name for FLUSH (virtio 1.2 section 5.2.6.3): served the same. */
  FLUSH_OUT: 5,
  GET_ID: 8,
  DISCARD: 11,
  WRITE_ZEROES: 13,
} as const;
/** Status values. */
export const BLK_S = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;
/** Sector size of the virtio-blk protocol. */
export const SECTOR = 512;
/** Length of the GET_ID answer. */
export const BLK_ID_BYTES = 20;

/** A parsed request. */
export interface BlkRequest {
  /** Request type. */
  type: number;
  /** First sector. */
  sector: number;
  /** Data buffers (device-writable for IN/GET_ID, readable otherwise), without header and status. */
  data: Uint8Array[];
  /** Bytes in `data`. */
  dataLen: number;
  /** The status byte. */
  status: Uint8Array;
  /** Bytes in the chain's device-writable part, the status byte included. */
  writableLen: number;
}

/** A discard / write-zeroes segment. */
export interface BlkSegment {
  /** First sector. */
  sector: number;
  /** Number of sectors. */
  sectors: number;
  /** Flags (bit 0: unmap for write-zeroes). */
  flags: number;
}

/** Why a chain is not a request we can even answer (no header or no status byte). */
export type ParseFailure = { error: string };

/** Parses a chain into a request. */
export function parseBlkRequest(chain: DescChain): BlkRequest | ParseFailure {
  if (chain.readableLen < 16) return { error: `request header is ${chain.readableLen} bytes, not 16` };
  if (chain.writableLen < 1) return { error: "request has no status byte" };
  const hdr = gather(chain.readable, 0, 16);
  const dv = new DataView(hdr.buffer, hdr.byteOffset, 16);
  const type = dv.getUint32(0, true);
  const sector = Number(dv.getBigUint64(8, true));
  const lastW = chain.writable[chain.writable.length - 1];
  let status: Uint8Array;
  let wData: Uint8Array[];
  if (lastW.length > 0) {
    status = lastW.subarray(lastW.length - 1);
    wData = sliceBuffers(chain.writable, 0, chain.writableLen - 1);
  } else {
    // A zero-length last descriptor: the status byte is the last byte of the writable bytes.
    const all = sliceBuffers(chain.writable, 0, chain.writableLen);
    const last = all[all.length - 1];
    status = last.subarray(last.length - 1);
    wData = sliceBuffers(chain.writable, 0, chain.writableLen - 1);
  }
  const deviceWrites = type === BLK_T.IN || type === BLK_T.GET_ID;
  const data = deviceWrites ? wData : sliceBuffers(chain.readable, 16, chain.readableLen - 16);
  const dataLen = deviceWrites ? chain.writableLen - 1 : chain.readableLen - 16;
  return { type, sector, data, dataLen, status, writableLen: chain.writableLen };
}

/** Parses the segments of a DISCARD or WRITE_ZEROES request's data. */
export function parseSegments(req: BlkRequest): BlkSegment[] | undefined {
  if (req.dataLen === 0 || req.dataLen % 16 !== 0) return undefined;
  const raw = gather(req.data, 0, req.dataLen);
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const out: BlkSegment[] = [];
  for (let o = 0; o < raw.length; o += 16) {
    out.push({
      sector: Number(dv.getBigUint64(o, true)),
      sectors: dv.getUint32(o + 8, true),
      flags: dv.getUint32(o + 12, true),
    });
  }
  return out;
}
