#!/bin/busybox sh
# /init of the tsvmm default guest. Mounts the basics, loads the virtio modules in
# dependency order, prints a marker, runs the checks named by tsvmm.checks= on the
# kernel command line (one parseable "TSVMM-CHECK name key=value..." line each),
# then gives a shell (tsvmm.shell=1) or powers off.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /mnt
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
while read -r m; do
  insmod "/lib/modules/$(uname -r)/$m" 2>/dev/null || echo "TSVMM-MODULE-FAILED $m"
done < /etc/tsvmm/modules.order

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }

echo "TSVMM-INIT-MARKER kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"

check_cpus() {
  echo "TSVMM-CHECK cpus online=$(cat /sys/devices/system/cpu/online) count=$(grep -c ^processor /proc/cpuinfo)"
}
check_virtio() {
  for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] || continue
    echo "TSVMM-CHECK virtio dev=$(basename "$d") device=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver")")"
  done
  echo "TSVMM-CHECK virtio-count n=$(ls /sys/bus/virtio/devices 2>/dev/null | wc -l)"
}
check_rng() {
  cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
  n=$(dd if=/dev/hwrng bs=65536 count=16 iflag=fullblock 2>/dev/null | wc -c)
  echo "TSVMM-CHECK rng current=$cur bytes=$n"
}

for c in $(arg tsvmm.checks | tr ',' ' '); do
  case "$c" in
    cpus) check_cpus ;;
    virtio) check_virtio ;;
    rng) check_rng ;;
    *) echo "TSVMM-CHECK $c unknown-check" ;;
  esac
done
echo "TSVMM-CHECKS-DONE"

if [ "$(arg tsvmm.shell)" = "1" ]; then
  echo "tsvmm default guest: busybox shell; 'poweroff -f' ends the VM"
  setsid cttyhack sh
fi
sync
poweroff -f
