/** The split virtqueue and descriptor walking, driven from the driver side in plain memory. */

import assert from "node:assert/strict";
import { DriverQueue, GuestRam } from "../harness/virtio_driver.ts";
import { SplitQueue } from "../../devices/virtio/queue.ts";
import { GuestMemory } from "../../vmm/memory.ts";
import {
  ChainError,
  gather,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../../devices/virtio/chain.ts";

function setup(size = 8, opts: { indirect?: boolean; eventIdx?: boolean } = {}) {
  const ram = new GuestRam(1 << 20);
  const dq = new DriverQueue(ram, size);
  const q = new SplitQueue(size);
  q.descAddr = dq.descAddr;
  q.availAddr = dq.availAddr;
  q.usedAddr = dq.usedAddr;
  q.ready = true;
  q.indirect = opts.indirect ?? false;
  q.eventIdx = opts.eventIdx ?? false;
  assert.equal(q.validate(ram.mem), undefined);
  return { ram, dq, q };
}

Deno.test("queue: a chain comes out readable first, then writable, with its head", () => {
  const { ram, dq, q } = setup();
  const a = ram.alloc(16), b = ram.alloc(100), c = ram.alloc(1);
  ram.view(a, 16).set([1, 2, 3]);
  const head = dq.add([{ addr: a, len: 16 }, { addr: b, len: 100, write: true }, {
    addr: c,
    len: 1,
    write: true,
  }]);
  const chain = q.pop(ram.mem)!;
  assert.equal(chain.head, head);
  assert.deepEqual([chain.readableLen, chain.writableLen], [16, 101]);
  assert.deepEqual(Array.from(gather(chain.readable, 0, 3)), [1, 2, 3]);
  q.pushUsed(ram.mem, chain.head, 101);
  assert.deepEqual(dq.takeUsed(), [[head, 101]]);
  assert.equal(q.pop(ram.mem), undefined);
});

Deno.test("queue: indirect tables work with the feature", () => {
  const { ram, dq, q } = setup(8, { indirect: true });
  const a = ram.alloc(16), b = ram.alloc(512);
  dq.add([{ addr: a, len: 16 }, { addr: b, len: 512, write: true }], { indirect: true });
  const chain = q.pop(ram.mem)!;
  assert.deepEqual([chain.readable.length, chain.writable.length, chain.writableLen], [1, 1, 512]);
});

Deno.test("queue: rings, tables and buffers in RAM above 4 GiB, beside RAM below it", () => {
  const low = new GuestRam(1 << 20);
  const high = new GuestRam(1 << 20, 0x1_0000_0000);
  const mem = new GuestMemory([...low.mem.regions, ...high.mem.regions]);
  const dq = new DriverQueue(high, 8);
  const q = Object.assign(new SplitQueue(8), {
    descAddr: dq.descAddr,
    availAddr: dq.availAddr,
    usedAddr: dq.usedAddr,
    ready: true,
    indirect: true,
  });
  assert.equal(q.validate(mem), undefined);
  const a = high.alloc(16), b = low.alloc(64), c = high.alloc(512);
  high.view(a, 16).set([7, 8, 9]);
  const head = dq.add([{ addr: a, len: 16 }, { addr: b, len: 64, write: true }, {
    addr: c,
    len: 512,
    write: true,
  }], { indirect: true });
  const chain = q.pop(mem)!;
  assert.deepEqual(Array.from(gather(chain.readable, 0, 3)), [7, 8, 9]);
  chain.writable[0][0] = 0xaa;
  chain.writable[1][511] = 0xbb;
  assert.deepEqual([low.view(b, 1)[0], high.view(c + 511, 1)[0]], [0xaa, 0xbb]);
  q.pushUsed(mem, chain.head, 576);
  assert.deepEqual(dq.takeUsed(), [[head, 576]]);
});

const hostile: Array<[string, (s: ReturnType<typeof setup>) => void, RegExp]> = [
  ["a descriptor loop", ({ dq, ram }) => {
    const a = ram.alloc(8);
    dq.setDesc(0, a, 8, VIRTQ_DESC_F_NEXT, 1);
    dq.setDesc(1, a, 8, VIRTQ_DESC_F_NEXT, 0);
    dq.publish(0);
  }, /loop/],
  ["a head index >= queue size", ({ dq }) => dq.publish(9), /head index 9 >= queue size 8/],
  ["a next index >= queue size", ({ dq, ram }) => {
    dq.setDesc(0, ram.alloc(8), 8, VIRTQ_DESC_F_NEXT, 200);
    dq.publish(0);
  }, /descriptor index 200 >= 8/],
  ["a chain longer than the queue", ({ dq, ram }) => {
    const a = ram.alloc(8);
    for (let i = 0; i < 8; i++) dq.setDesc(i, a, 8, VIRTQ_DESC_F_NEXT, (i + 1) % 8);
    dq.publish(0);
  }, /longer than 8/],
  ["indirect without the feature", ({ dq, ram }) => {
    dq.setDesc(0, ram.alloc(32), 32, VIRTQ_DESC_F_INDIRECT, 0);
    dq.publish(0);
  }, /without VIRTIO_F_INDIRECT_DESC/],
  ["a buffer outside guest RAM", ({ dq }) => {
    dq.setDesc(0, 0x4000_0000, 512, 0, 0);
    dq.publish(0);
  }, /outside guest RAM/],
  ["a buffer whose address + length overflows", ({ dq }) => {
    dq.setDesc(0, 0xffff_ffff_ffff_fff0n, 0x100, 0, 0);
    dq.publish(0);
  }, /outside guest RAM/],
  ["a buffer address with high bits set over an address inside RAM (no aliasing)", ({ dq, ram }) => {
    dq.setDesc(0, (1n << 32n) + BigInt(ram.alloc(64)), 64, 0, 0);
    dq.publish(0);
  }, /buffer 0x1[0-9a-f]{8}\+64 is outside guest RAM/],
  ["a buffer address of 2^53 and more, the low half inside RAM", ({ dq, ram }) => {
    dq.setDesc(0, (1n << 53n) + BigInt(ram.alloc(64)), 64, 0, 0);
    dq.publish(0);
  }, /outside guest RAM/],
  ["a readable buffer after a writable one", ({ dq, ram }) => {
    const a = ram.alloc(8);
    dq.setDesc(0, a, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
    dq.setDesc(1, a, 8, 0, 0);
    dq.publish(0);
  }, /readable descriptor after a device-writable/],
  [
    "the avail index jumping by more than the queue size",
    ({ dq }) => dq.setAvailIdx(9),
    /avail index moved by 9/,
  ],
];

for (const [what, make, msg] of hostile) {
  Deno.test(`queue: hostile input — ${what} — is a ChainError, not a crash`, () => {
    const s = setup();
    make(s);
    assert.throws(() => s.q.pop(s.ram.mem), (e: Error) => e instanceof ChainError && msg.test(e.message));
  });
}

Deno.test("queue: hostile indirect tables — nested, bad length, outside RAM", () => {
  const cases: Array<[(s: ReturnType<typeof setup>) => void, RegExp]> = [
    [({ dq, ram }) => {
      const t = ram.alloc(32);
      dq.setDesc(0, ram.alloc(32), 32, VIRTQ_DESC_F_INDIRECT, 0, t); // inside the table: nested
      dq.setDesc(0, t, 16, VIRTQ_DESC_F_INDIRECT, 0);
      dq.publish(0);
    }, /nested indirect/],
    [({ dq, ram }) => {
      dq.setDesc(0, ram.alloc(32), 20, VIRTQ_DESC_F_INDIRECT, 0);
      dq.publish(0);
    }, /not n\*16/],
    [({ dq }) => {
      dq.setDesc(0, 0x7000_0000, 64, VIRTQ_DESC_F_INDIRECT, 0);
      dq.publish(0);
    }, /outside guest RAM/],
    [({ dq, ram }) => {
      dq.setDesc(0, (1n << 32n) + BigInt(ram.alloc(32)), 32, VIRTQ_DESC_F_INDIRECT, 0);
      dq.publish(0);
    }, /descriptor table at 0x1[0-9a-f]{8} is outside/],
    [({ dq, ram }) => {
      dq.setDesc(0, ram.alloc(32), 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1);
      dq.publish(0);
    }, /NEXT set/],
  ];
  for (const [make, msg] of cases) {
    const s = setup(8, { indirect: true });
    make(s);
    assert.throws(() => s.q.pop(s.ram.mem), (e: Error) => e instanceof ChainError && msg.test(e.message));
  }
});

Deno.test("queue: validate refuses bad sizes and rings outside RAM", () => {
  const { ram, q } = setup();
  q.size = 6;
  assert.match(q.validate(ram.mem)!, /queue size 6 is invalid/);
  q.size = 16;
  assert.match(q.validate(ram.mem)!, /invalid \(max 8\)/);
  q.size = 8;
  q.usedAddr = 0x10_0000 - 8;
  assert.match(q.validate(ram.mem)!, /used ring is outside/);
});

Deno.test("queue: interrupt suppression — NO_INTERRUPT flag, and used_event with EVENT_IDX", () => {
  {
    const { ram, dq, q } = setup();
    dq.add([{ addr: ram.alloc(8), len: 8, write: true }]);
    q.pushUsed(ram.mem, q.pop(ram.mem)!.head, 8);
    assert.equal(q.needsInterrupt(ram.mem), true);
    dq.setAvailFlags(1);
    dq.add([{ addr: ram.alloc(8), len: 8, write: true }]);
    q.pushUsed(ram.mem, q.pop(ram.mem)!.head, 8);
    assert.equal(q.needsInterrupt(ram.mem), false);
  }
  {
    const { ram, dq, q } = setup(8, { eventIdx: true });
    dq.setUsedEvent(1); // interrupt when used.idx passes 1, i.e. after the 2nd entry
    for (let i = 0; i < 2; i++) dq.add([{ addr: ram.alloc(8), len: 8, write: true }]);
    q.pushUsed(ram.mem, q.pop(ram.mem)!.head, 8);
    assert.equal(q.needsInterrupt(ram.mem), false);
    q.pushUsed(ram.mem, q.pop(ram.mem)!.head, 8);
    assert.equal(q.needsInterrupt(ram.mem), true);
    assert.equal(q.enableNotification(ram.mem), false);
    assert.equal(dq.availEvent(), 2, "avail_event tells the driver to notify for the next entry");
  }
});
