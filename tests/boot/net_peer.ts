/**
 * The host end of the network boot cases and bench: TCP peers that send a guest a payload or
 * take one from it (md5 of every byte, with node:crypto), a ping of the guest's address, and
 * the rules every network test keeps. Addresses come only from 169.254.0.0/16 (never
 * 169.254.169.254), and a TAP is only ever created in a network namespace with no other
 * device: inside the nested runner's L1 (`TSVMM_NET_ISOLATED=1`, set by its /init), or in a
 * namespace the test made with `unshare --net` (see `inIsolatedNetns`).
 */

import { createHash } from "node:crypto";

/** The host address of test network `n` (169.254.n.1), checked against the rules. */
export function hostAddr(n: number): string {
  return linkLocal(`169.254.${n}.1`);
}

/** The guest address of test network `n` (169.254.n.2), checked against the rules. */
export function guestAddr(n: number): string {
  return linkLocal(`169.254.${n}.2`);
}

/** Returns `addr` if it is a 169.254.0.0/16 address other than 169.254.169.254; throws otherwise. */
export function linkLocal(addr: string): string {
  const p = addr.split(".").map(Number);
  const ok = p.length === 4 && p.every((x) => Number.isInteger(x) && x >= 0 && x <= 255) &&
    p[0] === 169 && p[1] === 254 && !(p[2] === 169 && p[3] === 254) && p[3] !== 0 && p[3] !== 255;
  if (!ok) throw new Error(`${addr}: network tests use 169.254.0.0/16 host addresses only`);
  return addr;
}

/**
 * Whether this process may create TAPs: it runs in the nested runner's L1 (no network device
 * at all) or in a namespace a test made for it, both marked with TSVMM_NET_ISOLATED=1.
 */
export function inIsolatedNetns(): boolean {
  return Deno.env.get("TSVMM_NET_ISOLATED") === "1";
}

/** Runs a command; resolves with its exit code and output (stdout then stderr). */
export async function runCmd(cmd: string, args: string[]): Promise<{ code: number; out: string }> {
  const r = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped", stdin: "null" }).output();
  const d = new TextDecoder();
  return { code: r.code, out: d.decode(r.stdout) + d.decode(r.stderr) };
}

/** Gives TAP `name` the address 169.254.n.1/24 and sets it up (busybox or iproute2 `ip`). */
export async function addressTap(name: string, n: number): Promise<void> {
  if (!inIsolatedNetns()) throw new Error("refusing to configure a TAP outside an isolated namespace");
  for (const args of [["addr", "add", `${hostAddr(n)}/24`, "dev", name], ["link", "set", name, "up"]]) {
    const r = await runCmd("ip", args);
    if (r.code !== 0) throw new Error(`ip ${args.join(" ")}: ${r.out.trim()}`);
  }
}

/** What a ping saw. */
export interface PingResult {
  /** Echo requests sent. */
  sent: number;
  /** Replies received. */
  received: number;
  /** Average round trip in ms (NaN if none came back). */
  avgMs: number;
  /** ping's output, for failure messages. */
  out: string;
}

/** Pings `addr` `count` times from the host (busybox or iputils ping). */
export async function hostPing(addr: string, count = 3, adaptive = false): Promise<PingResult> {
  const r = await runCmd("ping", [
    "-c",
    String(count),
    "-W",
    "5",
    ...(adaptive ? ["-A"] : []),
    linkLocal(addr),
  ]);
  const sent = Number(/(\d+) packets transmitted/.exec(r.out)?.[1] ?? 0);
  const received = Number(/(\d+) (?:packets )?received/.exec(r.out)?.[1] ?? 0);
  const avg = /min\/avg\/max(?:\/mdev)? = [\d.]+\/([\d.]+)\//.exec(r.out);
  return { sent, received, avgMs: avg ? Number(avg[1]) : NaN, out: r.out.trim() };
}

/** md5 of some bytes, hex. */
export function md5Hex(data: Uint8Array): string {
  return createHash("md5").update(data).digest("hex");
}

/** Pseudo-random bytes (xorshift, seeded): a payload whose every byte matters. */
export function payload(bytes: number, seed: number): Uint8Array {
  const b = new Uint8Array(bytes);
  const w = new Uint32Array(b.buffer, 0, bytes >> 2);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < w.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    w[i] = x >>> 0;
  }
  return b;
}

/** What one TCP peer saw. */
export interface TransferResult {
  /** Bytes sent to or received from the guest. */
  bytes: number;
  /** md5 of the bytes sent or received, hex. */
  md5: string;
  /** Milliseconds from accept to close. */
  ms: number;
  /** What went wrong, if something did. */
  error?: string;
}

/** A listening peer: `done` settles after its one connection; `close` stops it early. */
export interface Peer {
  /** Resolves with what the connection carried (never rejects). */
  done: Promise<TransferResult>;
  /** Stops listening (and drops a connection in progress). */
  close(): void;
}

function listen(addr: string, port: number, serve: (c: Deno.TcpConn) => Promise<TransferResult>): Peer {
  const l = Deno.listen({ hostname: linkLocal(addr), port, transport: "tcp" });
  let conn: Deno.TcpConn | undefined;
  let closed = false;
  const done = (async (): Promise<TransferResult> => {
    try {
      conn = await l.accept();
      l.close();
      closed = true;
      return await serve(conn);
    } catch (e) {
      return { bytes: 0, md5: "", ms: 0, error: String((e as Error).message ?? e) };
    } finally {
      try {
        conn?.close();
      } catch { /* closed already */ }
    }
  })();
  return {
    done,
    close: () => {
      if (!closed) {
        closed = true;
        l.close();
      }
      try {
        conn?.close();
      } catch { /* closed already */ }
    },
  };
}

/**
 * Listens on addr:port; sends `data` to the first connection, then closes it. With `gate`,
 * the first byte waits for it (the guest stays blocked in its receive meanwhile).
 */
export function sendingPeer(addr: string, port: number, data: Uint8Array, gate?: Promise<unknown>): Peer {
  return listen(addr, port, async (c) => {
    await gate;
    const t = performance.now();
    const hash = createHash("md5");
    let off = 0;
    while (off < data.length) {
      const chunk = data.subarray(off, Math.min(off + 256 * 1024, data.length));
      let w = 0;
      while (w < chunk.length) w += await c.write(chunk.subarray(w));
      hash.update(chunk);
      off += chunk.length;
    }
    return { bytes: off, md5: hash.digest("hex"), ms: performance.now() - t };
  });
}

/**
 * Listens on addr:port; reads the first connection until `expected` bytes came (or it ended),
 * then closes it.
 */
export function receivingPeer(addr: string, port: number, expected: number): Peer {
  return listen(addr, port, async (c) => {
    const t = performance.now();
    const hash = createHash("md5");
    const buf = new Uint8Array(256 * 1024);
    let n = 0;
    while (n < expected) {
      const r = await c.read(buf.subarray(0, Math.min(buf.length, expected - n)));
      if (r === null) break;
      hash.update(buf.subarray(0, r));
      n += r;
    }
    return { bytes: n, md5: hash.digest("hex"), ms: performance.now() - t };
  });
}
