# The virtio-MMIO register-page tiny guest (tests/vmm/tiny_guest_cases.ts, MMIO_GUEST):
# maps the first virtio-MMIO window (0xd0000000) with a 2 MiB page, reads registers and
# writes each value read to port 0x511, makes one rng request and waits for its interrupt
# in InterruptStatus, powers off through ACPI. Assembled with
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
# One rng request, served by the device thread through the notify's ioeventfd: status,
# VERSION_1, FEATURES_OK, queue 0 with 8 entries at 0x300000 (desc), 0x301000 (driver
# area), 0x302000 (device area), DRIVER_OK.
movl $3, 0x70(%rbx)
movl $1, 0x24(%rbx)       # DriverFeaturesSel = 1
movl $1, 0x20(%rbx)       # VERSION_1 (feature bit 32)
movl $0xb, 0x70(%rbx)     # + FEATURES_OK
movl $0, 0x30(%rbx)       # QueueSel = 0
movl $8, 0x38(%rbx)       # QueueNum = 8
movl $0x300000, 0x80(%rbx)
movl $0, 0x84(%rbx)
movl $0x301000, 0x90(%rbx)
movl $0, 0x94(%rbx)
movl $0x302000, 0xa0(%rbx)
movl $0, 0xa4(%rbx)
movl $1, 0x44(%rbx)       # QueueReady
movl $0xf, 0x70(%rbx)     # + DRIVER_OK
movq $0x303000, 0x300000  # descriptor 0: 16 bytes at 0x303000, device-writable
movl $16, 0x300008
movw $2, 0x30000c
movw $1, 0x301002         # avail.idx = 1 (ring[0] = descriptor 0, memory starts zeroed)
movl $0, 0x50(%rbx)       # QueueNotify
rdtsc                     # wait for InterruptStatus to show the used buffer, for at
shl $32, %rdx             # most 2^34 TSC cycles (some seconds), then go on with 0
or %rdx, %rax
mov $1, %rdi
shl $34, %rdi
add %rax, %rdi
1:
mov 0x60(%rbx), %eax
test %eax, %eax
jnz 2f
rdtsc
shl $32, %rdx
or %rdx, %rax
cmp %rdi, %rax
jb 1b
xor %eax, %eax
2:
mov $0x511, %dx
out %eax, %dx             # InterruptStatus
mov %eax, 0x64(%rbx)      # InterruptACK
mov 0x60(%rbx), %eax
out %eax, %dx             # InterruptStatus after the ACK
movzwl 0x302002, %eax
out %eax, %dx             # used.idx
mov $0x600, %dx           # ACPI sleep control: power off
mov $0x34, %al
out %al, %dx
hlt
