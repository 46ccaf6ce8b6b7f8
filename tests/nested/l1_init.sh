#!/bin/busybox sh
# /init of the nested runner's L1 VM: loads the real KVM modules (kvm_amd on QEMU's
# emulated SVM CPU), reports L1's network controllers (none expected), then runs the
# program the runner chose (tests/nested/l1_main.ts, or the bench) with the project's
# Deno, reporting over the serial console.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /root
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# No synchronous compaction for transparent huge pages (both VMMs ask for them for guest RAM):
# under TCG, compacting L1's memory on a huge-page fault appears to stall both of L1's CPUs for
# minutes (README, Known problems). Free huge pages are still used.
echo never > /sys/kernel/mm/transparent_hugepage/defrag 2>/dev/null || echo "TSVMM-L1-THP-DEFRAG-UNSET"
while read -r m; do
  insmod "/lib/modules/$(uname -r)/$m" || echo "TSVMM-L1-MODULE-FAILED $m"
done < /etc/tsvmm/modules.order
# Network controllers (PCI class 0x02) on L1's buses: the runner asks for none.
echo "TSVMM-L1-PCI-NET n=$(cat /sys/bus/pci/devices/*/class 2>/dev/null | grep -c '^0x02')"
[ -c /dev/kvm ] && echo "TSVMM-L1-KVM-READY" || echo "TSVMM-L1-NO-KVM"
cd /proj
export PATH=/usr/bin:/bin:/sbin:/usr/sbin HOME=/root DENO_DIR=/tmp/deno-dir DENO_NO_UPDATE_CHECK=1 NO_COLOR=1
export TSVMM_GUEST_ASSETS=/proj/.cache/guest/assets.json
# L1 has no network device (the runner asserts it): the network cases may create their TAPs here.
export TSVMM_NET_ISOLATED=1
/bin/deno run -A --no-check "$(cat /etc/tsvmm/l1_program)" /etc/tsvmm/l1_args
echo "TSVMM-L1-DONE rc=$?"
poweroff -f
