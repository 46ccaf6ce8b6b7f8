/**
 * KVM ABI: ioctl numbers and struct layouts (linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
 * Layouts are given as sizes and named byte offsets; everything is little-endian.
 */

const IOC_NONE = 0n;
const IOC_WRITE = 1n;
const IOC_READ = 2n;
const KVMIO = 0xaen;

function ioc(dir: bigint, nr: number, size: number): bigint {
  return (dir << 30n) | (BigInt(size) << 16n) | (KVMIO << 8n) | BigInt(nr);
}
const io = (nr: number) => ioc(IOC_NONE, nr, 0);
const ior = (nr: number, size: number) => ioc(IOC_READ, nr, size);
const iow = (nr: number, size: number) => ioc(IOC_WRITE, nr, size);
const iowr = (nr: number, size: number) => ioc(IOC_READ | IOC_WRITE, nr, size);

/** Sizes of the KVM structs we pass by pointer. */
export const SIZE = {
  userspaceMemoryRegion: 32,
  regs: 144,
  sregs: 312,
  fpu: 416,
  lapic: 1024,
  cpuidEntry: 40,
  msrEntry: 16,
  pitConfig: 64,
  irqfd: 32,
  ioeventfd: 64,
  irqLevel: 8,
  irqchip: 520,
  vcpuEvents: 64,
} as const;

/** ioctl request numbers. */
export const KVM = {
  GET_API_VERSION: io(0x00),
  CREATE_VM: io(0x01),
  CHECK_EXTENSION: io(0x03),
  GET_VCPU_MMAP_SIZE: io(0x04),
  GET_SUPPORTED_CPUID: iowr(0x05, 8),
  CREATE_VCPU: io(0x41),
  SET_USER_MEMORY_REGION: iow(0x46, SIZE.userspaceMemoryRegion),
  SET_TSS_ADDR: io(0x47),
  SET_IDENTITY_MAP_ADDR: iow(0x48, 8),
  CREATE_IRQCHIP: io(0x60),
  IRQ_LINE: iow(0x61, SIZE.irqLevel),
  GET_IRQCHIP: iowr(0x62, SIZE.irqchip),
  IRQFD: iow(0x76, SIZE.irqfd),
  SET_GSI_ROUTING: iow(0x6a, 8),
  CREATE_PIT2: iow(0x77, SIZE.pitConfig),
  IOEVENTFD: iow(0x79, SIZE.ioeventfd),
  RUN: io(0x80),
  GET_REGS: ior(0x81, SIZE.regs),
  SET_REGS: iow(0x82, SIZE.regs),
  GET_SREGS: ior(0x83, SIZE.sregs),
  SET_SREGS: iow(0x84, SIZE.sregs),
  SET_MSRS: iow(0x89, 8),
  GET_FPU: ior(0x8c, SIZE.fpu),
  SET_FPU: iow(0x8d, SIZE.fpu),
  GET_LAPIC: ior(0x8e, SIZE.lapic),
  SET_LAPIC: iow(0x8f, SIZE.lapic),
  SET_CPUID2: iow(0x90, 8),
  GET_MP_STATE: ior(0x98, 4),
  GET_VCPU_EVENTS: ior(0x9f, SIZE.vcpuEvents),
} as const;

/** KVM_CHECK_EXTENSION capability numbers we ask about. */
export const CAP = {
  IRQCHIP: 0,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  EXT_CPUID: 7,
  NR_VCPUS: 9,
  MAX_VCPUS: 66,
  PIT2: 33,
  IRQFD: 32,
  IOEVENTFD: 36,
  TSC_DEADLINE_TIMER: 72,
  READONLY_MEM: 81,
  IMMEDIATE_EXIT: 136,
} as const;

/** kvm_run.exit_reason values. */
export const EXIT = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  HYPERCALL: 3,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24,
} as const;

/** Names for exit reasons in reports. */
export const EXIT_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(EXIT).map(([k, v]) => [v, k]),
);

/** Byte offsets inside struct kvm_run. */
export const RUN = {
  immediateExit: 1,
  exitReason: 8,
  // union at 32
  ioDirection: 32,
  ioSize: 33,
  ioPort: 34,
  ioCount: 36,
  ioDataOffset: 40,
  mmioPhysAddr: 32,
  mmioData: 40,
  mmioLen: 48,
  mmioIsWrite: 52,
  failReason: 32,
  internalSuberror: 32,
  internalNdata: 36,
  internalData: 40,
  systemEventType: 32,
} as const;

/** Byte offsets in struct kvm_regs (18 u64 in this order). */
export const REGS = {
  rax: 0,
  rbx: 8,
  rcx: 16,
  rdx: 24,
  rsi: 32,
  rdi: 40,
  rsp: 48,
  rbp: 56,
  rip: 128,
  rflags: 136,
} as const;

/** Byte offsets in struct kvm_sregs. Segments are 24 bytes each. */
export const SREGS = {
  cs: 0,
  ds: 24,
  es: 48,
  fs: 72,
  gs: 96,
  ss: 120,
  tr: 144,
  ldt: 168,
  gdt: 192,
  idt: 208,
  cr0: 224,
  cr2: 232,
  cr3: 240,
  cr4: 248,
  cr8: 256,
  efer: 264,
  apicBase: 272,
} as const;

/** The system event types of KVM_EXIT_SYSTEM_EVENT. */
export const SYSTEM_EVENT = { SHUTDOWN: 1, RESET: 2, CRASH: 3 } as const;
