/** The x86-64 guest physical address map (docs/DESIGN.md section 3). */

/** GDT. */
export const GDT_ADDR = 0x500;
/** IDT (empty; the kernel installs its own). */
export const IDT_ADDR = 0x520;
/** PVH start_info and its memory map. */
export const PVH_INFO_ADDR = 0x6000;
/** Zero page (struct boot_params). */
export const ZERO_PAGE_ADDR = 0x7000;
/** Initial stack pointer. */
export const BOOT_STACK_ADDR = 0x8ff0;
/** PML4, PDPT, PD of the identity map. */
export const PML4_ADDR = 0x9000;
/** Page-directory-pointer table. */
export const PDPT_ADDR = 0xa000;
/** Page directory (512 x 2 MiB = first GiB). */
export const PD_ADDR = 0xb000;
/** Kernel command line. */
export const CMDLINE_ADDR = 0x20000;
/** Largest command line we place (the kernel's own limit is checked separately). */
export const CMDLINE_MAX = 0x10000;
/** End of conventional low RAM; [EBDA_START, 1 MiB) is reserved. */
export const EBDA_START = 0x9fc00;
/** ACPI tables live in [ACPI_START, RSDP_ADDR). */
export const ACPI_START = 0x9fc00;
/** RSDP (the kernel also finds it by acpi_rsdp_addr / PVH start_info). */
export const RSDP_ADDR = 0xe0000;
/** Kernel load address for bzImage. */
export const HIMEM_START = 0x100000;
/** RAM below 4 GiB ends here; the rest of RAM starts at 4 GiB. */
export const RAM_32BIT_END = 0xc000_0000;
/** Start of RAM above the 32-bit MMIO hole. */
export const RAM_64BIT_START = 0x1_0000_0000;
/** PCI 32-bit MMIO window (BARs). */
export const PCI_MMIO_START = 0xc000_0000;
/** Size of the PCI 32-bit MMIO window. */
export const PCI_MMIO_SIZE = 0x1000_0000;
/** PCI I/O window for I/O BARs (the legacy devices' ports are below it). */
export const PCI_IO_START = 0xc000;
/** End of the PCI I/O window (exclusive). */
export const PCI_IO_END = 0x1_0000;
/** Size of the 64-bit PCI window above RAM (announced in _CRS). */
export const PCI_MMIO64_SIZE = 0x4_0000_0000;
/** IOAPIC pins of PCI INTx (INTA of device d is pin PCI_INTX_GSIS[d % 4], as _PRT says). */
export const PCI_INTX_GSIS: readonly number[] = [20, 21, 22, 23];
/** virtio-mmio device windows, 4 KiB each. */
export const VIRTIO_MMIO_START = 0xd000_0000;
/** Size of one virtio-mmio window. */
export const VIRTIO_MMIO_SIZE = 0x1000;
/** PCI ECAM (MCFG) for bus 0. */
export const ECAM_START = 0xe000_0000;
/** ECAM size: one bus. */
export const ECAM_SIZE = 0x10_0000;
/** KVM's TSS (three pages) and identity-map page, outside RAM. */
export const KVM_TSS_ADDR = 0xfffb_d000;
/** KVM identity map page (Intel). */
export const KVM_IDENTITY_MAP_ADDR = 0xfffb_c000;
/** IOAPIC. */
export const IOAPIC_ADDR = 0xfec0_0000;
/** Local APIC. */
export const LAPIC_ADDR = 0xfee0_0000;

/** Port of the ACPI sleep control register (hardware-reduced ACPI). */
export const ACPI_SLEEP_CONTROL_PORT = 0x600;
/** Port of the ACPI sleep status register. */
export const ACPI_SLEEP_STATUS_PORT = 0x601;
/** Port of the ACPI reset register. */
export const ACPI_RESET_PORT = 0x602;
/** Value written to the reset register to reset. */
export const ACPI_RESET_VALUE = 0x1;

/** COM1. */
export const COM1_PORT = 0x3f8;
/** COM1's ISA IRQ. */
export const COM1_IRQ = 4;
/** i8042 data and command ports, keyboard IRQ. */
export const I8042_DATA_PORT = 0x60;
/** i8042 status/command port. */
export const I8042_CMD_PORT = 0x64;
/** Keyboard IRQ. */
export const I8042_IRQ = 1;

/** Where the 64-bit PCI window starts for `memSize` bytes of RAM: above RAM, 1 GiB aligned. */
export function pciMmio64Start(memSize: number): number {
  const top = memSize <= RAM_32BIT_END ? RAM_64BIT_START : RAM_64BIT_START + memSize - RAM_32BIT_END;
  return Math.ceil(top / 2 ** 30) * 2 ** 30;
}

/** The guest RAM ranges for `memSize` bytes of RAM: [gpa, size][]. */
export function ramRanges(memSize: number): Array<[number, number]> {
  if (memSize <= RAM_32BIT_END) return [[0, memSize]];
  return [[0, RAM_32BIT_END], [RAM_64BIT_START, memSize - RAM_32BIT_END]];
}
