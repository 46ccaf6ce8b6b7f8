/** Typed wrapper for a KVM VM fd. */

import { ioctlBuf, ioctlVal } from "./kvm.ts";
import { sysClose } from "./sys/libc.ts";
import { KVM, SIZE } from "./sys/kvm_abi.ts";

/** KVM_MEM_READONLY, a memory slot flag. */
const MEM_READONLY = 2;
/** KVM_PIT_SPEAKER_DUMMY: the PIT's speaker port is emulated as a dummy. */
const PIT_SPEAKER_DUMMY = 1;
/** KVM_IRQFD_FLAG_* */
const IRQFD_FLAG_DEASSIGN = 1;
const IRQFD_FLAG_RESAMPLE = 2;
/** KVM_IOEVENTFD_FLAG_* */
const IOEVENTFD_DATAMATCH = 1;
const IOEVENTFD_PIO = 2;
const IOEVENTFD_DEASSIGN = 4;
/** kvm_irq_routing_entry types and size. */
const ROUTING_IRQCHIP = 1;
const ROUTING_MSI = 2;
const ROUTING_ENTRY_SIZE = 48;

/** One entry of the GSI routing table. */
export type GsiRoute =
  | { gsi: number; kind: "irqchip"; chip: number; pin: number }
  | { gsi: number; kind: "msi"; addressLo: number; addressHi: number; data: number };

/** A VM file descriptor and the VM-wide ioctls. */
export class VmFd {
  /** The VM descriptor. */
  readonly fd: number;
  private readonly irqBuf = new Uint8Array(SIZE.irqLevel);
  private readonly irqView = new DataView(this.irqBuf.buffer);

  /** Wraps an fd returned by KVM_CREATE_VM. */
  constructor(fd: number) {
    this.fd = fd;
  }

  /**
   * KVM_SET_USER_MEMORY_REGION. With `readOnly` (KVM_MEM_READONLY) the guest reads the
   * pages as memory and each of its writes exits as an MMIO write (ioeventfds still match).
   */
  setUserMemoryRegion(slot: number, gpa: number, size: number, hostAddr: bigint, readOnly = false): void {
    const b = new Uint8Array(SIZE.userspaceMemoryRegion);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, slot, true);
    dv.setUint32(4, readOnly ? MEM_READONLY : 0, true);
    dv.setBigUint64(8, BigInt(gpa), true);
    dv.setBigUint64(16, BigInt(size), true);
    dv.setBigUint64(24, hostAddr, true);
    ioctlBuf(this.fd, KVM.SET_USER_MEMORY_REGION, b, "KVM_SET_USER_MEMORY_REGION");
  }

  /** KVM_CHECK_EXTENSION on this VM (some answers depend on the VM's type). */
  checkExtension(cap: number): number {
    return ioctlVal(this.fd, KVM.CHECK_EXTENSION, BigInt(cap), "KVM_CHECK_EXTENSION");
  }

  /** KVM_SET_TSS_ADDR (three pages, below 4 GiB, outside RAM). */
  setTssAddr(addr: number): void {
    ioctlVal(this.fd, KVM.SET_TSS_ADDR, BigInt(addr), "KVM_SET_TSS_ADDR");
  }

  /** KVM_SET_IDENTITY_MAP_ADDR (one page; used by Intel real-mode emulation). */
  setIdentityMapAddr(addr: number): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(addr), true);
    ioctlBuf(this.fd, KVM.SET_IDENTITY_MAP_ADDR, b, "KVM_SET_IDENTITY_MAP_ADDR");
  }

  /** KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and LAPICs. */
  createIrqchip(): void {
    ioctlVal(this.fd, KVM.CREATE_IRQCHIP, 0n, "KVM_CREATE_IRQCHIP");
  }

  /** KVM_CREATE_PIT2 with a dummy speaker port. */
  createPit2(): void {
    const b = new Uint8Array(SIZE.pitConfig);
    new DataView(b.buffer).setUint32(0, PIT_SPEAKER_DUMMY, true);
    ioctlBuf(this.fd, KVM.CREATE_PIT2, b, "KVM_CREATE_PIT2");
  }

  /** KVM_GET_IRQCHIP for chip `id` (0 PIC master, 1 PIC slave, 2 IOAPIC): its 512-byte state. */
  getIrqchip(id: number): Uint8Array {
    const b = new Uint8Array(SIZE.irqchip);
    new DataView(b.buffer).setUint32(0, id, true);
    ioctlBuf(this.fd, KVM.GET_IRQCHIP, b, "KVM_GET_IRQCHIP");
    return b.subarray(8);
  }

  /** KVM_IRQ_LINE: drives GSI `gsi` to `level`. */
  irqLine(gsi: number, level: boolean): void {
    this.irqView.setUint32(0, gsi, true);
    this.irqView.setUint32(4, level ? 1 : 0, true);
    ioctlBuf(this.fd, KVM.IRQ_LINE, this.irqBuf, "KVM_IRQ_LINE");
  }

  /**
   * KVM_IRQFD: a write to `eventFd` raises `gsi`. Without `resampleFd` that is an edge;
   * with it the line stays asserted until the guest's EOI, which signals `resampleFd`
   * (a level-triggered line the VMM re-asserts while its device still wants service).
   */
  irqfd(eventFd: number, gsi: number, resampleFd?: number): void {
    const b = new Uint8Array(SIZE.irqfd);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, eventFd, true);
    dv.setUint32(4, gsi, true);
    if (resampleFd !== undefined) {
      dv.setUint32(8, IRQFD_FLAG_RESAMPLE, true);
      dv.setUint32(12, resampleFd, true);
    }
    ioctlBuf(this.fd, KVM.IRQFD, b, "KVM_IRQFD");
  }

  /** KVM_IRQFD with DEASSIGN: `eventFd` no longer raises `gsi`. */
  irqfdDeassign(eventFd: number, gsi: number): void {
    const b = new Uint8Array(SIZE.irqfd);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, eventFd, true);
    dv.setUint32(4, gsi, true);
    dv.setUint32(8, IRQFD_FLAG_DEASSIGN, true);
    ioctlBuf(this.fd, KVM.IRQFD, b, "KVM_IRQFD (deassign)");
  }

  /** KVM_SET_GSI_ROUTING: replaces the whole routing table with `routes`. */
  setGsiRouting(routes: readonly GsiRoute[]): void {
    const b = new Uint8Array(8 + ROUTING_ENTRY_SIZE * routes.length);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, routes.length, true);
    routes.forEach((r, i) => {
      const o = 8 + ROUTING_ENTRY_SIZE * i;
      dv.setUint32(o, r.gsi, true);
      if (r.kind === "irqchip") {
        dv.setUint32(o + 4, ROUTING_IRQCHIP, true);
        dv.setUint32(o + 16, r.chip, true);
        dv.setUint32(o + 20, r.pin, true);
      } else {
        dv.setUint32(o + 4, ROUTING_MSI, true);
        dv.setUint32(o + 16, r.addressLo >>> 0, true);
        dv.setUint32(o + 20, r.addressHi >>> 0, true);
        dv.setUint32(o + 24, r.data >>> 0, true);
      }
    });
    ioctlBuf(this.fd, KVM.SET_GSI_ROUTING, b, "KVM_SET_GSI_ROUTING");
  }

  /**
   * KVM_IOEVENTFD: a guest write of `len` bytes at `addr` signals `eventFd` (with
   * `deassign`, the same registration is removed).
   */
  ioeventfd(
    eventFd: number,
    addr: number,
    len: number,
    opts: { pio?: boolean; datamatch?: number; deassign?: boolean } = {},
  ): void {
    const b = new Uint8Array(SIZE.ioeventfd);
    const dv = new DataView(b.buffer);
    let flags = (opts.pio ? IOEVENTFD_PIO : 0) | (opts.deassign ? IOEVENTFD_DEASSIGN : 0);
    if (opts.datamatch !== undefined) {
      flags |= IOEVENTFD_DATAMATCH;
      dv.setBigUint64(0, BigInt(opts.datamatch), true);
    }
    dv.setBigUint64(8, BigInt(addr), true);
    dv.setUint32(16, len, true);
    dv.setInt32(20, eventFd, true);
    dv.setUint32(24, flags, true);
    ioctlBuf(this.fd, KVM.IOEVENTFD, b, "KVM_IOEVENTFD");
  }

  /** Closes the VM fd. */
  close(): void {
    sysClose(this.fd);
  }
}
