#!/bin/busybox sh
# /init of the tsvmm default guest. Mounts the basics, loads the virtio modules in
# dependency order, prints a marker, runs the checks named by tsvmm.checks= on the
# kernel command line (one parseable "TSVMM-CHECK name key=value..." line each),
# then gives a shell (tsvmm.shell=1) or powers off.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /mnt
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Module parameters from the command line (name.param=value), as modprobe would pass them:
# insmod does not read /proc/cmdline, and a built-in driver on one kernel is a module on another.
while read -r m; do
  name=$(basename "$m"); name=${name%%.ko*}; name=$(echo "$name" | tr '-' '_')
  params=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$name\.//p" | tr '\n' ' ')
  insmod "/lib/modules/$(uname -r)/$m" $params 2>/dev/null || echo "TSVMM-MODULE-FAILED $m"
done < /etc/tsvmm/modules.order

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
# Seconds since boot to the microsecond: the kernel's monotonic clock, which /proc/timer_list
# gives in ns on its "now at" line; else /proc/uptime (10 ms steps).
up() {
  t=$(sed -n '/^now at /{s/^now at \([0-9]*\) nsecs.*/\1/p;q;}' /proc/timer_list 2>/dev/null)
  if [ -n "$t" ]; then echo "$t" | awk '{printf "%.6f\n", $1 / 1e9}'; else cut -d' ' -f1 /proc/uptime; fi
}
# Let the virtio drivers finish probing before the checks look.
sleep 0.2 2>/dev/null || sleep 1

echo "TSVMM-INIT-MARKER kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"

# tsvmm.net=IF:ADDR/LEN[+IF:ADDR/LEN...]: bring each interface up with that address. IF is an
# interface name (eth0) or a MAC (52:54:00:12:34:56), which names a NIC whatever order its
# transport probes in. One "IFACE=ADDR/LEN" word per entry ("-WANTED=ADDR/LEN" for an interface not
# found) is kept in /tmp/net for the checks.
: > /tmp/net
ifname_of() {
  if echo "$1" | grep -qiE '^([0-9a-f]{2}:){5}[0-9a-f]{2}$'; then
    for n in /sys/class/net/*; do
      [ "$(cat "$n/address" 2>/dev/null)" = "$(echo "$1" | tr 'A-F' 'a-f')" ] && { basename "$n"; return; }
    done
  elif [ -e "/sys/class/net/$1" ]; then
    echo "$1"
  fi
}
for e in $(arg tsvmm.net | tr '+' ' '); do
  if echo "$e" | grep -qiE '^([0-9a-f]{2}:){6}'; then
    want=$(echo "$e" | cut -c1-17); addr=$(echo "$e" | cut -c19-)
  else
    want=${e%%:*}; addr=${e#*:}
  fi
  i=$(ifname_of "$want")
  if [ -z "$i" ]; then echo "TSVMM-NET-MISSING $want"; echo "-$want=$addr" >> /tmp/net; continue; fi
  ip link set "$i" up && ip addr add "$addr" dev "$i" || echo "TSVMM-NET-FAILED $i $addr"
  echo "$i=$addr" >> /tmp/net
done
if [ -s /tmp/net ]; then
  # Link up (operstate "up", carrier 1) on every interface found, 10 s at most.
  n=0
  while [ $n -lt 50 ]; do
    down=0
    for w in $(cat /tmp/net); do
      i=${w%%=*}; [ "${i#-}" = "$i" ] || continue
      [ "$(cat /sys/class/net/$i/operstate 2>/dev/null)" = up ] || down=1
    done
    [ $down = 0 ] && break
    sleep 0.2; n=$((n + 1))
  done
fi
ip link set lo up 2>/dev/null

check_cpus() {
  echo "TSVMM-CHECK cpus online=$(cat /sys/devices/system/cpu/online) count=$(grep -c ^processor /proc/cpuinfo)"
}
check_mem() {
  echo "TSVMM-CHECK mem total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
}
check_virtio() {
  for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] || continue
    f=$(cat "$d/features" 2>/dev/null)
    echo "TSVMM-CHECK virtio dev=$(basename "$d") device=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver")") v1=$(echo "$f" | cut -c33)"
  done
  echo "TSVMM-CHECK virtio-count n=$(ls /sys/bus/virtio/devices 2>/dev/null | wc -l) force_legacy=$(cat /sys/module/virtio_pci/parameters/force_legacy 2>/dev/null)"
}
# Every PCI function: IDs, revision, class, the driver bound to it.
check_pci() {
  for d in /sys/bus/pci/devices/*; do
    [ -e "$d" ] || continue
    drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
    echo "TSVMM-CHECK pci dev=$(basename "$d") vendor=$(cat "$d/vendor") device=$(cat "$d/device") rev=$(cat "$d/revision") class=$(cat "$d/class") subsys=$(cat "$d/subsystem_device") driver=${drv:-none}"
  done
}
# What the kernel said about PCI resources (ECAM, BAR placement); problems are asserted absent.
check_pcilog() {
  dmesg | grep -E "MMCONFIG|ECAM|not reserved|can't claim|no compatible bridge window|no space for|PCI: Fatal|virtio" |
    sed 's/^\[[ 0-9.]*\] //; s/^/TSVMM-CHECK pcilog /'
  echo "TSVMM-CHECK pcilog-done"
}
# Interrupt lines of the virtio devices: chip type and count summed over CPUs.
check_irqs() {
  awk -v n="$(grep -c ^processor /proc/cpuinfo)" '/virtio/ {
    c = 0; for (i = 2; i <= n + 1; i++) c += $i
    kind = "other"; if ($0 ~ /PCI-MSI/) kind = "msi"; else if ($0 ~ /IO-APIC/) kind = "ioapic"
    printf "TSVMM-CHECK irq name=%s kind=%s count=%d\n", $NF, kind, c
  }' /proc/interrupts
  echo "TSVMM-CHECK irqs-done"
}
# Where each module's code is (for matching a hung vCPU's RIP in a failure report).
check_modules() {
  echo "TSVMM-CHECK modules $(awk '{printf "%s@%s+%s ", $1, $6, $2}' /proc/modules)"
}
check_rng() {
  cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
  want=$(arg tsvmm.rngbytes); want=${want:-1048576}
  n=$(dd if=/dev/hwrng bs=4096 count=$((want / 4096)) iflag=fullblock 2>/dev/null | wc -c)
  echo "TSVMM-CHECK rng current=$cur bytes=$n"
}
# tsvmm.blk=vda,vdb: what the guest sees of each disk.
check_blk() {
  for d in $(arg tsvmm.blk | tr ',' ' '); do
    echo "TSVMM-CHECK blk dev=$d sectors=$(cat /sys/block/$d/size 2>/dev/null) ro=$(cat /sys/block/$d/ro 2>/dev/null) serial=$(cat /sys/block/$d/serial 2>/dev/null)"
  done
}
# tsvmm.write=vda:OFFSET:TEXT[+...]: write TEXT at byte OFFSET, fsync, drop caches, read it back.
check_write() {
  for w in $(arg tsvmm.write | tr '+' ' '); do
    d=${w%%:*}; rest=${w#*:}; off=${rest%%:*}; text=${rest#*:}
    if printf '%s' "$text" | dd of=/dev/$d bs=1 seek=$off conv=notrunc,fsync 2>/tmp/err; then ok=1; else ok=0; fi
    sync; echo 3 > /proc/sys/vm/drop_caches
    back=$(dd if=/dev/$d bs=1 skip=$off count=${#text} 2>/dev/null)
    echo "TSVMM-CHECK write dev=$d ok=$ok back=$back err=$(head -c 80 /tmp/err | tr ' \n' '__')"
  done
}
# tsvmm.read=vda:OFFSET:LEN[+...]: print LEN bytes at OFFSET (text the host put there).
check_read() {
  for r in $(arg tsvmm.read | tr '+' ' '); do
    d=${r%%:*}; rest=${r#*:}; off=${rest%%:*}; len=${rest#*:}
    echo "TSVMM-CHECK read dev=$d text=$(dd if=/dev/$d bs=1 skip=$off count=$len 2>/dev/null)"
  done
}
# tsvmm.mkfs=vda: make an ext4 file system, write files through it, unmount.
check_mkfs() {
  d=$(arg tsvmm.mkfs)
  ok=0
  if mkfs.ext4 -F -q /dev/$d && mount -t ext4 /dev/$d /mnt; then
    echo hello-from-the-guest > /mnt/hello.txt
    dd if=/dev/urandom of=/mnt/random.bin bs=65536 count=32 2>/dev/null
    mkdir -p /mnt/dir/sub && echo nested > /mnt/dir/sub/file
    sync
    sum=$(md5sum /mnt/random.bin | cut -d' ' -f1)
    umount /mnt && ok=1
    # Mounted again, the file's data comes back from the disk (umount dropped its pages).
    if [ $ok = 1 ] && mount -t ext4 -o ro /dev/$d /mnt; then
      again=$(md5sum /mnt/random.bin | cut -d' ' -f1)
      umount /mnt || ok=0
    fi
  fi
  echo "TSVMM-CHECK mkfs dev=$d ok=$ok md5=$sum md5_again=$again"
}

# tsvmm.ddbench=vda[:MiB]: sequential read and write of the disk and a read of /dev/hwrng
# with dd, each timed with up() (busybox dd prints no rate).
check_ddbench() {
  spec=$(arg tsvmm.ddbench); d=${spec%%:*}; mb=${spec#*:}; [ "$mb" = "$spec" ] && mb=32
  a=$(up); dd if=/dev/$d of=/dev/null bs=1048576 count=$mb 2>/dev/null; b=$(up)
  dd if=/dev/zero of=/dev/$d bs=1048576 count=$mb conv=fsync 2>/dev/null; c=$(up)
  dd if=/dev/hwrng of=/dev/null bs=4096 count=4 iflag=fullblock 2>/dev/null; e=$(up)
  echo "TSVMM-CHECK ddbench mb=$mb read_s=$(echo $b $a | awk '{print $1-$2}') write_s=$(echo $c $b | awk '{print $1-$2}') rng_kib=16 rng_s=$(echo $e $c | awk '{print $1-$2}')"
}

# tsvmm.fio=SECONDS: 4 KiB random read and write IOPS at queue depth 1 and 32 (libaio,
# O_DIRECT) on the first virtio disk that is not the read-only fio tools disk
# (vmm/guest/tools_disk.ts), which is found by mounting each disk; VMMs number disks differently.
check_fio() {
  s=$(arg tsvmm.fio); s=${s:-5}; tools=""; d=""
  mkdir -p /tools
  for b in /sys/block/vd*; do
    b=${b##*/}
    if [ -z "$tools" ] && mount -t ext4 -o ro /dev/$b /tools 2>/dev/null; then
      if [ -x /tools/fio ]; then tools=$b; continue; fi
      umount /tools
    fi
    [ -z "$d" ] && d=$b
  done
  if [ -z "$tools" ] || [ -z "$d" ]; then echo "TSVMM-CHECK fio error=no-disks tools=$tools dev=$d"; return; fi
  out=""
  for job in randread:1 randread:32 randwrite:1 randwrite:32; do
    rw=${job%%:*}; qd=${job#*:}
    # terse v3: field 8 is read IOPS, field 49 write IOPS
    iops=$(/tools/ld.so --library-path /tools/lib /tools/fio --name=j --filename=/dev/$d --direct=1 \
      --rw=$rw --bs=4k --iodepth=$qd --ioengine=libaio --runtime=$s --time_based \
      --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{print ($8 > 0) ? $8 : $49}')
    out="$out ${rw}_qd${qd}=${iops:-0}"
  done
  umount /tools
  echo "TSVMM-CHECK fio dev=$d$out"
}

# The host end of interface number $1 (1-based) in /tmp/net: tsvmm.netpeer=A[+B...] in the same
# order, else .1 of the interface's /24.
net_peer() {
  p=$(arg tsvmm.netpeer | tr '+' '\n' | sed -n "${1}p")
  if [ -z "$p" ]; then
    a=$(sed -n "${1}p" /tmp/net); a=${a#*=}; a=${a%/*}
    p=${a%.*}.1
  fi
  echo "$p"
}
# One line per interface of tsvmm.net=: its state, MAC, MTU, the virtio device behind it (its
# negotiated features, its transport's bus, the PCI IDs when on PCI) and a ping of its peer.
# tsvmm.pings=N[:A]: N echo requests (default 3), each sent as soon as the last reply came with A.
check_net() {
  k=0; pings=$(arg tsvmm.pings); popt=""
  [ "${pings%:A}" != "$pings" ] && { popt=-A; pings=${pings%:A}; }
  pings=${pings:-3}
  for w in $(cat /tmp/net); do
    k=$((k + 1)); i=${w%%=*}; addr=${w#*=}; peer=$(net_peer $k)
    if [ "${i#-}" != "$i" ]; then echo "TSVMM-CHECK net want=${i#-} error=no-such-interface"; continue; fi
    vdev=$(readlink -f /sys/class/net/$i/device); parent=$(dirname "$vdev")
    bus=other; ids=none
    case "$(readlink -f "$parent/subsystem")" in
      */bus/pci) bus=pci; ids=$(cat "$parent/vendor"):$(cat "$parent/device"):$(cat "$parent/revision") ;;
      */bus/platform) bus=platform ;;
    esac
    ping -c "$pings" -W 5 $popt "$peer" > /tmp/ping 2>&1
    tx=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' /tmp/ping)
    rx=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping)
    rtt=$(sed -n 's#^round-trip min/avg/max = [0-9.]*/\([0-9.]*\)/.*#\1#p' /tmp/ping)
    # Each reply's time, sorted: the smallest, the median and the largest.
    sed -n 's/.* time=\([0-9.]*\) ms$/\1/p' /tmp/ping | sort -n > /tmp/rtts
    nr=$(wc -l < /tmp/rtts)
    med=$(sed -n "$(((nr + 1) / 2))p" /tmp/rtts); lo=$(head -n 1 /tmp/rtts); hi=$(tail -n 1 /tmp/rtts)
    echo "TSVMM-CHECK net if=$i mac=$(cat /sys/class/net/$i/address) addr=$addr" \
      "state=$(cat /sys/class/net/$i/operstate) carrier=$(cat /sys/class/net/$i/carrier 2>/dev/null)" \
      "mtu=$(cat /sys/class/net/$i/mtu) vdev=$(basename "$vdev")" \
      "driver=$(basename "$(readlink "$vdev/driver")") bus=$bus parent=$(basename "$parent") ids=$ids" \
      "features=$(cat "$vdev/features") peer=$peer ping_tx=${tx:-0} ping_rx=${rx:-0} rtt_ms=${rtt:-none}" \
      "rtt_min_ms=${lo:-none} rtt_median_ms=${med:-none} rtt_max_ms=${hi:-none}"
  done
  echo "TSVMM-CHECK net-done"
}
# tsvmm.xfer=PORT[:MiB]: per interface, receive MiB (default 64) from its peer's PORT (the host
# sends, then closes) and print the md5 of what arrived; then send a file of MiB from
# /dev/urandom, made once, to the peer's PORT+1 (the host closes once it has it all) and print
# that file's md5. Times are seconds from up(); a transfer still going
# after 120 s is cut (nc's exit code then says so).
check_xfer() {
  spec=$(arg tsvmm.xfer); port=${spec%%:*}; mb=${spec#*:}; [ "$mb" = "$spec" ] && mb=64
  dd if=/dev/urandom of=/tmp/tx bs=1048576 count=$mb 2>/dev/null
  txmd5=$(md5sum /tmp/tx | cut -d' ' -f1); txbytes=$(wc -c < /tmp/tx)
  k=0
  for w in $(cat /tmp/net); do
    k=$((k + 1)); i=${w%%=*}; peer=$(net_peer $k)
    [ "${i#-}" = "$i" ] || continue
    a=$(up)
    timeout 120 nc "$peer" "$port" < /dev/null > /tmp/rx 2>/tmp/nc.err; rc1=$?
    b=$(up)
    rxbytes=$(wc -c < /tmp/rx); rxmd5=$(md5sum /tmp/rx | cut -d' ' -f1); rm -f /tmp/rx
    c=$(up)
    timeout 120 nc "$peer" $((port + 1)) < /tmp/tx > /dev/null 2>>/tmp/nc.err; rc2=$?
    d=$(up)
    echo "TSVMM-CHECK xfer if=$i peer=$peer rx_rc=$rc1 rx_bytes=$rxbytes rx_md5=$rxmd5" \
      "rx_s=$(echo $b $a | awk '{print $1-$2}') tx_rc=$rc2 tx_bytes=$txbytes tx_md5=$txmd5" \
      "tx_s=$(echo $d $c | awk '{print $1-$2}') err=$(head -c 80 /tmp/nc.err | tr ' \n' '__')"
  done
  rm -f /tmp/tx
  echo "TSVMM-CHECK xfer-done"
}

# tsvmm.iperf=SECONDS: TCP throughput with iperf3 from the tools disk (vmm/guest/tools_disk.ts,
# found by mounting each disk) against an iperf3 server on each interface's peer: guest to host,
# then host to guest (-R), in Mbit/s as the receiving side counted them.
check_iperf() {
  s=$(arg tsvmm.iperf); s=${s:-5}; found=0
  mkdir -p /tools
  for b in /sys/block/vd*; do
    b=${b##*/}
    if mount -t ext4 -o ro /dev/$b /tools 2>/dev/null; then
      [ -x /tools/iperf3 ] && { found=1; break; }
      umount /tools
    fi
  done
  if [ $found = 0 ]; then echo "TSVMM-CHECK iperf error=no-tools-disk"; return; fi
  k=0
  for w in $(cat /tmp/net); do
    k=$((k + 1)); i=${w%%=*}; peer=$(net_peer $k)
    [ "${i#-}" = "$i" ] || continue
    out=""
    for dir in tx rx; do
      r=""; [ $dir = rx ] && r=-R
      /tools/ld.so --library-path /tools/lib /tools/iperf3 -c "$peer" -t "$s" -f m $r > /tmp/iperf 2>&1
      mbps=$(awk '/receiver$/ {print $(NF-2)}' /tmp/iperf)
      [ -n "$mbps" ] || tail -n 3 /tmp/iperf | sed 's/^/TSVMM-IPERF-OUT /'
      out="$out ${dir}_mbps=${mbps:-0}"
    done
    echo "TSVMM-CHECK iperf if=$i peer=$peer$out"
  done
  umount /tools
}

# Kernel log lines that say something went wrong (warnings with their call traces, BUGs,
# ACPI and firmware complaints), one "TSVMM-DMESG line" each, then a count. Run it last.
DMESG_BAD='(^|[^a-z])(warning|bug):|call trace|acpi error|acpi warning|fw_bug|firmware bug'
check_dmesg() {
  dmesg > /tmp/dmesg
  grep -iE "$DMESG_BAD" /tmp/dmesg | while IFS= read -r l; do echo "TSVMM-DMESG $l"; done
  echo "TSVMM-CHECK dmesg lines=$(wc -l < /tmp/dmesg) flagged=$(grep -ciE "$DMESG_BAD" /tmp/dmesg)"
}

for c in $(arg tsvmm.checks | tr ',' ' '); do
  case "$c" in
    cpus) check_cpus ;;
    mem) check_mem ;;
    virtio) check_virtio ;;
    pci) check_pci ;;
    irqs) check_irqs ;;
    pcilog) check_pcilog ;;
    modules) check_modules ;;
    rng) check_rng ;;
    blk) check_blk ;;
    write) check_write ;;
    read) check_read ;;
    mkfs) check_mkfs ;;
    ddbench) check_ddbench ;;
    fio) check_fio ;;
    net) check_net ;;
    xfer) check_xfer ;;
    iperf) check_iperf ;;
    dmesg) check_dmesg ;;
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
