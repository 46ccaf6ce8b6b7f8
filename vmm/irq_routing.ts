/**
 * The one owner of the VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole
 * table, so it always carries the in-kernel irqchip's routes (what KVM installs by
 * default: GSIs 0-15 to the PIC and IOAPIC, 16-23 to the IOAPIC; COM1, the i8042 and the
 * virtio-MMIO and PCI INTx pins depend on them) plus one MSI route per MSI-X vector that
 * may be delivered. Each such vector has its own GSI (from 24 up) and an irqfd.
 */

import type { GsiRoute, VmFd } from "./vm.ts";

/** The VM operations routing needs. */
export type RoutingVm = Pick<VmFd, "irqfd" | "irqfdDeassign" | "setGsiRouting">;
import { signalEventfd } from "./event_loop.ts";
import { sysClose, sysEventfd } from "./sys/libc.ts";
import type { MsiRouter, MsixVector } from "../devices/pci/msix.ts";

/** IOAPIC pins (GSIs 0-23). */
const IOAPIC_PINS = 24;

/** Whether an MSI message can be delivered: the x86 interrupt address range 0xFEExxxxx. */
export function isMsiAddress(addressLo: number, addressHi: number): boolean {
  return addressHi === 0 && (addressLo >>> 20) === 0xfee;
}

/** The GSI routing table of one VM. */
export class GsiRouting {
  private nextGsi = IOAPIC_PINS;
  private readonly msi = new Map<number, { addressLo: number; addressHi: number; data: number }>();
  /** Table writes so far (for diagnostics). */
  commits = 0;

  /** The routing table of `vm`. */
  constructor(private readonly vm: RoutingVm) {}

  /** A GSI for an MSI vector. */
  allocate(): number {
    return this.nextGsi++;
  }

  /** Sets or clears (undefined) the MSI route of `gsi`; call `commit` after. */
  setMsi(gsi: number, msg: { addressLo: number; addressHi: number; data: number } | undefined): void {
    if (msg) this.msi.set(gsi, msg);
    else this.msi.delete(gsi);
  }

  /** The whole table as KVM gets it. */
  routes(): GsiRoute[] {
    const out: GsiRoute[] = [];
    for (let gsi = 0; gsi < IOAPIC_PINS; gsi++) {
      if (gsi < 16) out.push({ gsi, kind: "irqchip", chip: gsi < 8 ? 0 : 1, pin: gsi % 8 });
      out.push({ gsi, kind: "irqchip", chip: 2, pin: gsi });
    }
    for (const [gsi, m] of [...this.msi].sort((a, b) => a[0] - b[0])) out.push({ gsi, kind: "msi", ...m });
    return out;
  }

  /** Writes the table to KVM. */
  commit(): void {
    this.vm.setGsiRouting(this.routes());
    this.commits++;
  }

  /** An MSI-X router for a function with `count` vectors. */
  router(count: number): VectorRouter {
    return new VectorRouter(this.vm, this, count);
  }
}

/**
 * One function's MSI-X vectors as KVM routes: a deliverable vector (unmasked, with an
 * interrupt address) has an MSI route and an irqfd; signalling it is an eventfd write.
 * On a change the irqfds of vectors that stopped being deliverable are deassigned first,
 * then the table is written, then the new ones are assigned (the other order has crashed
 * AMD hosts).
 */
export class VectorRouter implements MsiRouter {
  private readonly gsis: number[];
  private readonly fds: number[];
  private readonly live: Array<{ addressLo: number; addressHi: number; data: number } | undefined>;
  private readonly assigned: boolean[];

  /** Vectors of one function. */
  constructor(private readonly vm: RoutingVm, private readonly routing: GsiRouting, count: number) {
    this.gsis = Array.from({ length: count }, () => routing.allocate());
    this.fds = Array.from({ length: count }, () => sysEventfd());
    this.live = new Array(count).fill(undefined);
    this.assigned = new Array(count).fill(false);
  }

  /** MsiRouter: the table changed. */
  update(vectors: readonly MsixVector[]): void {
    const want = vectors.map((v) =>
      !v.masked && isMsiAddress(v.addressLo, v.addressHi)
        ? { addressLo: v.addressLo, addressHi: v.addressHi, data: v.data }
        : undefined
    );
    let tableChanged = false;
    want.forEach((w, i) => {
      if (!w && this.assigned[i]) {
        this.vm.irqfdDeassign(this.fds[i], this.gsis[i]);
        this.assigned[i] = false;
      }
      const cur = this.live[i];
      const same = (!w && !cur) ||
        (w && cur && w.addressLo === cur.addressLo && w.addressHi === cur.addressHi && w.data === cur.data);
      if (!same) {
        this.live[i] = w;
        this.routing.setMsi(this.gsis[i], w);
        tableChanged = true;
      }
    });
    if (tableChanged) this.routing.commit();
    want.forEach((w, i) => {
      if (w && !this.assigned[i]) {
        this.vm.irqfd(this.fds[i], this.gsis[i]);
        this.assigned[i] = true;
      }
    });
  }

  /**
   * The eventfd of each vector. A write to one whose vector is masked stays counted in the
   * eventfd and KVM delivers it when the irqfd is assigned again (on unmask), as a pending bit.
   */
  get eventfds(): readonly number[] {
    return this.fds;
  }

  /** MsiRouter: delivers vector `index` if it has a route. */
  signal(index: number): void {
    if (this.assigned[index]) signalEventfd(this.fds[index]);
  }

  /** Closes the eventfds (the VM is going away). */
  close(): void {
    for (const fd of this.fds) sysClose(fd);
    this.fds.length = 0;
  }
}
