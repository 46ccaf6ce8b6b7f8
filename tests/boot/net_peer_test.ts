import { guestAddr, hostAddr, linkLocal, md5Hex, payload } from "./net_peer.ts";

Deno.test("network tests: only 169.254.0.0/16 host addresses, never 169.254.169.254", () => {
  for (const ok of ["169.254.20.1", "169.254.0.1", "169.254.255.254"]) linkLocal(ok);
  for (const bad of ["169.254.169.254", "10.0.0.1", "127.0.0.1", "169.253.1.1", "169.254.1.0", "169.254.1"]) {
    let threw = false;
    try {
      linkLocal(bad);
    } catch {
      threw = true;
    }
    if (!threw) throw new Error(`${bad} accepted`);
  }
  if (hostAddr(20) !== "169.254.20.1" || guestAddr(20) !== "169.254.20.2") throw new Error("test net 20");
});

Deno.test("network payloads: seeded, every byte varies", () => {
  const a = payload(1 << 20, 1), b = payload(1 << 20, 1), c = payload(1 << 20, 2);
  if (md5Hex(a) !== md5Hex(b) || md5Hex(a) === md5Hex(c)) throw new Error("payload not seeded");
  const seen = new Set(a.subarray(0, 4096));
  if (seen.size < 200) throw new Error(`payload has ${seen.size} distinct byte values`);
});
