# The virtio-MMIO register-page tiny guest (tests/vmm/tiny_guest_cases.ts, MMIO_GUEST):
# maps the first virtio-MMIO window (0xd0000000) with a 2 MiB page, reads registers and
# writes each value read to port 0x511, powers off through ACPI. Assembled with
# `as tiny_mmio_guest.s -o g.o && objcopy -O binary -j .text g.o g.bin`.
.code64
# The boot tables map the first GiB only: PDPT[3] -> a page directory at 0x200000 with
# one 2 MiB page at 0xd0000000, then a TLB flush.
movq $0x200003, 0xa018
mov $0xd0000083, %ecx
mov %rcx, 0x200400
mov %cr3, %rax
mov %rax, %cr3
mov $0xd0000000, %ebx
mov $0x511, %dx
mov (%rbx), %eax          # MagicValue
out %eax, %dx
mov 4(%rbx), %eax         # Version
out %eax, %dx
mov 8(%rbx), %eax         # DeviceID
out %eax, %dx
movl $1, 0x30(%rbx)       # QueueSel = 1 (no such queue on virtio-rng)
mov 0x34(%rbx), %eax      # QueueNumMax
out %eax, %dx
movl $0, 0x30(%rbx)       # QueueSel = 0
mov 0x34(%rbx), %eax      # QueueNumMax
out %eax, %dx
mov 0x60(%rbx), %eax      # InterruptStatus
out %eax, %dx
mov 0x70(%rbx), %eax      # Status
out %eax, %dx
movl $1, 0x70(%rbx)       # Status = ACKNOWLEDGE
mov 0x70(%rbx), %eax
out %eax, %dx
movl $3, 0x70(%rbx)       # + DRIVER
movl $7, 0x70(%rbx)       # + DRIVER_OK without FEATURES_OK: the device needs a reset
mov 0x70(%rbx), %eax
out %eax, %dx
movl $0, 0x70(%rbx)       # reset
mov 0x70(%rbx), %eax
out %eax, %dx
mov $0x600, %dx           # ACPI sleep control: power off
mov $0x34, %al
out %al, %dx
hlt
