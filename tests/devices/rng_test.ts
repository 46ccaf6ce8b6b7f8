/** virtio-rng through the modern MMIO transport, driven from the driver side. */

import assert from "node:assert/strict";
import { CountingIrq, DriverQueue, F, GuestRam, MmioDriver } from "../harness/virtio_driver.ts";
import { VirtioMmio } from "../../transports/mmio.ts";
import { VirtioRng } from "../../devices/virtio/rng.ts";

function rngVm(opts: ConstructorParameters<typeof VirtioRng>[1] = {}) {
  const ram = new GuestRam(4 << 20);
  const dev = new VirtioRng({ fill: (b) => crypto.getRandomValues(b) }, opts);
  const d = new MmioDriver(new VirtioMmio(dev, ram.mem, new CountingIrq()));
  d.negotiate(F.VERSION_1 | F.EVENT_IDX | F.INDIRECT);
  const q = new DriverQueue(ram, 64);
  d.setupQueue(0, q);
  d.driverOk();
  return { ram, dev, d, q };
}

Deno.test("rng: buffers come back filled with distinct random bytes", () => {
  const { ram, d, q } = rngVm();
  const bufs = [ram.alloc(4096), ram.alloc(4096)];
  q.add([{ addr: bufs[0], len: 4096, write: true }]);
  q.add([{ addr: bufs[1], len: 2048, write: true }, { addr: bufs[1] + 2048, len: 2048, write: true }], {
    indirect: true,
  });
  d.notify(0);
  assert.deepEqual(q.takeUsed().map(([, len]) => len), [4096, 4096]);
  const a = ram.view(bufs[0], 4096), b = ram.view(bufs[1], 4096);
  assert.notDeepEqual(a, b);
  assert.ok(new Set(a).size > 200, "bytes look random");
});

Deno.test("rng: one request is capped at maxRequestBytes", () => {
  const { ram, d, q } = rngVm({ maxRequestBytes: 1000 });
  q.add([{ addr: ram.alloc(65536), len: 65536, write: true }]);
  d.notify(0);
  assert.deepEqual(q.takeUsed(), [[0, 1000]]);
});

Deno.test("rng: the rate limit holds requests until tokens accrue", () => {
  let now = 0;
  const timers: Array<() => void> = [];
  const { ram, dev, d, q } = rngVm({
    rateBytesPerSec: 1000,
    maxRequestBytes: 1000,
    now: () => now,
    later: (fn) => timers.push(fn),
  });
  for (let i = 0; i < 3; i++) q.add([{ addr: ram.alloc(1000), len: 1000, write: true }]);
  d.notify(0);
  assert.deepEqual(q.takeUsed().map(([, l]) => l), [1000], "one second's worth at once");
  assert.equal(timers.length, 1, "a retry is scheduled");
  now = 500;
  timers.shift()!();
  assert.deepEqual(q.takeUsed().map(([, l]) => l), [500], "half a second later: half the bytes");
  now = 1500;
  timers.shift()!();
  assert.deepEqual(q.takeUsed().map(([, l]) => l), [1000]);
  assert.equal(dev.bytesServed, 2500);
});
