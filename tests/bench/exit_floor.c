/*
 * The floor for the vCPU exit round trip: the smallest C VMM that runs a guest doing N
 * `out` instructions to port 0x510 (real mode, one exit each) and answers each exit in
 * the thread that called KVM_RUN. Prints microseconds per exit, one line per round.
 * Usage: exit_floor [N [ROUNDS [KVM_DEVICE [CPU]]]]; with CPU, the program runs on that CPU only
 * (as tsvmm's vCPU thread does with pinVcpus). Built and run by tests/bench/exit_bench.ts.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int fail(const char *what) {
  perror(what);
  return 1;
}

int main(int argc, char **argv) {
  uint32_t n = argc > 1 ? (uint32_t)strtoul(argv[1], 0, 0) : 20000;
  int rounds = argc > 2 ? atoi(argv[2]) : 5;
  const char *dev = argc > 3 ? argv[3] : "/dev/kvm";
  if (argc > 4) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(atoi(argv[4]), &one);
    if (sched_setaffinity(0, sizeof one, &one) != 0) return fail("sched_setaffinity");
  }
  int kvm = open(dev, O_RDWR | O_CLOEXEC);
  if (kvm < 0) return fail(dev);
  int runsz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (runsz <= 0) return fail("KVM_GET_VCPU_MMAP_SIZE");
  /* mov ecx, n; mov dx, 0x510; l: out dx, al; dec ecx; jnz l; hlt */
  uint8_t code[] = {0x66, 0xb9, n, n >> 8, n >> 16, n >> 24, 0xba, 0x10, 0x05,
                    0xee, 0x66, 0x49, 0x75, 0xfb, 0xf4};
  for (int r = 0; r < rounds; r++) {
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) return fail("KVM_CREATE_VM");
    size_t memsz = 0x10000;
    uint8_t *mem = mmap(0, memsz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return fail("mmap");
    memcpy(mem + 0x1000, code, sizeof code);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = memsz, .userspace_addr = (uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) return fail("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) return fail("KVM_CREATE_VCPU");
    struct kvm_run *run = mmap(0, runsz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) return fail("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) return fail("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) return fail("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = 0x1000;
    regs.rflags = 2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) return fail("KVM_SET_REGS");
    uint32_t exits = 0;
    struct timespec a, b;
    for (;;) {
      if (ioctl(vcpu, KVM_RUN, 0) < 0) return fail("KVM_RUN");
      if (run->exit_reason == KVM_EXIT_IO && run->io.port == 0x510) {
        /* Timed from the first exit to the last, as the Deno side times its own. */
        exits++;
        if (exits == 1) clock_gettime(CLOCK_MONOTONIC, &a);
        else if (exits == n) clock_gettime(CLOCK_MONOTONIC, &b);
        continue;
      }
      if (run->exit_reason == KVM_EXIT_HLT) break;
      fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
      return 1;
    }
    if (exits != n || n < 2) {
      fprintf(stderr, "%u exits, expected %u\n", exits, n);
      return 1;
    }
    double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / (n - 1);
    printf("%.3f\n", us);
    fflush(stdout);
    munmap(run, runsz);
    close(vcpu);
    close(vm);
    munmap(mem, memsz);
  }
  return 0;
}
