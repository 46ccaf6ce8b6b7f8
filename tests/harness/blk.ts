/** A virtio-blk device on a real image file behind a modern MMIO transport, driven from the driver side. */

import { type Buf, CountingIrq, DriverQueue, F, GuestRam, MmioDriver } from "./virtio_driver.ts";
import { VirtioMmio } from "../../transports/mmio.ts";
import { VirtioBlk } from "../../devices/virtio/blk.ts";
import type { BlockBackend } from "../../devices/virtio/blk_backend.ts";
import { FileBackend } from "../../vmm/block_file.ts";

/** One MiB. */
export const MIB: number = 1 << 20;

/** Options of a harness block VM. */
export interface BlkVmOptions {
  /** Open the image readonly. */
  readonly?: boolean;
  /** GET_ID serial. */
  serial?: string;
  /** Image size in bytes (default 1 MiB). */
  size?: number;
  /** Features the driver acknowledges (default: everything offered). */
  features?: (offered: bigint) => bigint;
  /** Queue size the driver sets up (default 64). */
  queueSize?: number;
  /** Directory of the image file (default: the temp directory). */
  dir?: string;
  /** Wraps the file backend (a slow or counting one). */
  wrap?: (b: FileBackend) => BlockBackend;
}

/**
 * An image whose sector n starts with byte n, a virtio-blk device on it, 8 MiB of RAM and
 * a 64-entry queue set up and running.
 */
export async function blkVm(opts: BlkVmOptions = {}): Promise<Vm> {
  const path = await Deno.makeTempFile({ suffix: ".img", dir: opts.dir });
  const init = new Uint8Array(opts.size ?? MIB);
  for (let i = 0; i < init.length; i += 512) init[i] = (i / 512) & 0xff; // sector n starts with n
  await Deno.writeFile(path, init);
  const backend = FileBackend.open(path, opts.readonly ?? false);
  const dev = new VirtioBlk(opts.wrap ? opts.wrap(backend) : backend, { serial: opts.serial });
  const ram = new GuestRam(8 << 20);
  const irq = new CountingIrq();
  const d = new MmioDriver(new VirtioMmio(dev, ram.mem, irq));
  const all = F.VERSION_1 | F.EVENT_IDX | F.INDIRECT | (dev.features & ~(F.EVENT_IDX | F.INDIRECT));
  d.negotiate(opts.features ? opts.features(all) : all);
  const q = new DriverQueue(ram, opts.queueSize ?? 64);
  d.setupQueue(0, q);
  d.driverOk();
  const close = async () => {
    await backend.close();
    await Deno.remove(path);
  };
  return { path, dev, ram, d, q, irq, backend, close };
}

/** What blkVm gives. */
export interface Vm {
  /** The image file. */
  path: string;
  /** The device. */
  dev: VirtioBlk;
  /** Guest RAM. */
  ram: GuestRam;
  /** The register driver. */
  d: MmioDriver;
  /** The request queue. */
  q: DriverQueue;
  /** The device's interrupt line. */
  irq: CountingIrq;
  /** The file backend (unwrapped). */
  backend: FileBackend;
  /** Closes the image and removes it. */
  close: () => Promise<void>;
}

/** Sends one request; resolves with its status, used length and data buffer once the device completes it. */
export async function request(
  vm: Vm,
  type: number,
  sector: number,
  data: { len: number; write?: boolean; bytes?: Uint8Array },
): Promise<{ status: number; len: number; buf: number }> {
  const hdr = vm.ram.alloc(16);
  const dv = vm.ram.dv(hdr, 16);
  dv.setUint32(0, type, true);
  dv.setBigUint64(8, BigInt(sector), true);
  const buf = vm.ram.alloc(Math.max(data.len, 1), 512);
  if (data.bytes) vm.ram.view(buf, data.bytes.length).set(data.bytes);
  const status = vm.ram.alloc(1);
  vm.ram.view(status, 1)[0] = 0xee;
  const bufs: Buf[] = [{ addr: hdr, len: 16 }];
  if (data.len) bufs.push({ addr: buf, len: data.len, write: data.write });
  bufs.push({ addr: status, len: 1, write: true });
  vm.q.add(bufs);
  vm.d.notify(0);
  for (let i = 0; i < 500; i++) {
    const used = vm.q.takeUsed();
    if (used.length) return { status: vm.ram.view(status, 1)[0], len: used[0][1], buf };
    await new Promise((r) => setTimeout(r, 2));
  }
  throw new Error("request not completed");
}
