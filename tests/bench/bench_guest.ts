/**
 * The bench's own guest program: a shell script that runs as the guest's first process
 * (`rdinit=/bench/init`) from a small cpio archive appended to the default initramfs (the
 * kernel unpacks concatenated archives in order), so the default /init (vmm/guest/init.sh)
 * stays as it is. It starts as that /init does (mounts, the virtio modules in their order),
 * then runs the bench's workload, printing `TSVMM-PHASE start NAME` and `TSVMM-PHASE end NAME`
 * around each measured step so the host can read the VMM's CPU time across exactly that step,
 * and prints the same `TSVMM-CHECK ddbench` / `TSVMM-CHECK fio` lines the default /init does.
 * Its first line, `TSVMM-USERSPACE`, is the moment the guest reached user space.
 */

import { CpioTree } from "../../vmm/guest/cpio.ts";

/** The first line the bench's guest program prints. */
export const USERSPACE_MARKER = "TSVMM-USERSPACE";
/** The line it prints when its workload is done (then it powers off). */
export const DONE_MARKER = /TSVMM-BENCH-DONE/;

const PREAMBLE = `#!/bin/busybox sh
echo "${USERSPACE_MARKER}"
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /mnt /tools
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
while read -r m; do
  insmod "/lib/modules/$(uname -r)/$m" 2>/dev/null || echo "TSVMM-MODULE-FAILED $m"
done < /etc/tsvmm/modules.order
sleep 0.2 2>/dev/null || sleep 1
phase() { echo "TSVMM-PHASE $1 $2"; }
# Seconds since boot to the microsecond: the kernel's monotonic clock, which /proc/timer_list
# gives in ns on its "now at" line; else /proc/uptime (10 ms steps).
up() {
  t=$(sed -n '/^now at /{s/^now at \\([0-9]*\\) nsecs.*/\\1/p;q;}' /proc/timer_list 2>/dev/null)
  if [ -n "$t" ]; then echo "$t" | awk '{printf "%.6f\\n", $1 / 1e9}'; else cut -d' ' -f1 /proc/uptime; fi
}
# The read-only tools disk (fio) is the one that mounts with /tools/fio on it, whatever order
# the VMM gives the disks; every other virtio disk is a data disk ($data, in order).
find_disks() {
  tools=""; data=""
  for b in /sys/block/vd*; do
    b=\${b##*/}
    if [ -z "$tools" ] && mount -t ext4 -o ro /dev/$b /tools 2>/dev/null; then
      if [ -x /tools/fio ]; then tools=$b; continue; fi
      umount /tools
    fi
    data="$data $b"
  done
}
fio() { /tools/ld.so --library-path /tools/lib /tools/fio "$@"; }
`;

const END = `
echo "TSVMM-BENCH-DONE"
sync
poweroff -f
`;

/**
 * Sequential read and write of the first disk (dd, MiB each, 1 MiB blocks, the write with
 * fsync) and 16 KiB from /dev/hwrng, then 64 KiB more (1,024 requests of 64 bytes, with the
 * device's code warm); prints the default /init's ddbench line and the second read's time
 * (`TSVMM-CHECK rng64 s=`).
 */
export function ddScript(mib: number): string {
  return PREAMBLE + `
phase start seq_read; a=$(up)
dd if=/dev/vda of=/dev/null bs=1048576 count=${mib} 2>/dev/null
b=$(up); phase end seq_read
phase start seq_write
dd if=/dev/zero of=/dev/vda bs=1048576 count=${mib} conv=fsync 2>/dev/null
c=$(up); phase end seq_write
dd if=/dev/hwrng of=/dev/null bs=4096 count=4 iflag=fullblock 2>/dev/null; e=$(up)
echo "TSVMM-CHECK ddbench mb=${mib} read_s=$(echo $b $a | awk '{print $1-$2}') write_s=$(echo $c $b | awk '{print $1-$2}') rng_kib=16 rng_s=$(echo $e $c | awk '{print $1-$2}')"
dd if=/dev/hwrng of=/dev/null bs=4096 count=16 iflag=fullblock 2>/dev/null; f=$(up)
echo "TSVMM-CHECK rng64 s=$(echo $f $e | awk '{print $1-$2}')"
` + END;
}

/** The fio jobs of the device bench, in the order they run. */
export const FIO_JOBS = ["randread_qd1", "randread_qd32", "randwrite_qd1", "randwrite_qd32"] as const;

/**
 * fio's four 4 KiB random jobs (libaio, O_DIRECT, `seconds` each) on the first data disk, each
 * between phase lines; the end line carries the job's I/O count (`ios=`). fio is run once
 * before, unmeasured, so its ~85 MB of libraries are in the guest's page cache.
 */
export function fioScript(seconds: number): string {
  return PREAMBLE + `
find_disks; set -- $data; d=$1
if [ -z "$tools" ] || [ -z "$d" ]; then echo "TSVMM-CHECK fio error=no-disks tools=$tools dev=$d"; else
  fio --version >/dev/null 2>&1
  out=""
  for job in ${FIO_JOBS.map((j) => j.replace("_qd", ":")).join(" ")}; do
    rw=\${job%%:*}; qd=\${job#*:}
    phase start \${rw}_qd$qd
    # terse v3: fields 6 and 8 are read KiB and IOPS, 47 and 49 the same for writes
    r=$(fio --name=j --filename=/dev/$d --direct=1 --rw=$rw --bs=4k --iodepth=$qd --ioengine=libaio \\
      --runtime=${seconds} --time_based --output-format=terse --terse-version=3 2>/dev/null |
      awk -F';' '{print ($8 > 0) ? $8 " " $6 / 4 : $49 " " $47 / 4}')
    phase end "\${rw}_qd$qd ios=\${r#* }"
    out="$out \${rw}_qd$qd=\${r%% *}"
  done
  umount /tools
  echo "TSVMM-CHECK fio dev=$d$out"
fi
` + END;
}

/**
 * 4 KiB random reads at QD `qd` per job, `numjobs` = the guest's vCPUs, over every data disk
 * (one job list across them: `--filename=/dev/vdb:/dev/vdc:...`), `seconds` long; prints
 * `TSVMM-CHECK scale cpus=N disks=M iops=X`.
 */
export function scaleScript(seconds: number, qd: number): string {
  return PREAMBLE + `
find_disks; n=$(grep -c ^processor /proc/cpuinfo); set -- $data
if [ -z "$tools" ] || [ $# = 0 ]; then echo "TSVMM-CHECK scale error=no-disks tools=$tools data=$data"; else
  files=""; for b in $data; do files="$files\${files:+:}/dev/$b"; done
  fio --version >/dev/null 2>&1
  phase start scale
  iops=$(fio --name=j --filename=$files --direct=1 --rw=randread --bs=4k --iodepth=${qd} --ioengine=libaio \\
    --numjobs=$n --group_reporting --runtime=${seconds} --time_based --output-format=terse --terse-version=3 \\
    2>/dev/null | awk -F';' '{print $8}')
  phase end scale
  umount /tools
  echo "TSVMM-CHECK scale cpus=$n disks=$# iops=\${iops:-0}"
fi
` + END;
}

/** The kernel command line that runs the bench's guest program. */
export function benchCmdline(): string {
  return "console=ttyS0 reboot=k panic=-1 quiet rdinit=/bench/init";
}

const made = new Map<string, string>();

/**
 * The default initramfs `base` with an archive holding `script` as /bench/init appended (the
 * base padded to 4 bytes first, as the kernel's unpacker requires); a temporary file, made
 * once per (base, script) in this process.
 */
export async function benchInitrd(base: string, script: string): Promise<string> {
  const key = `${base}\n${script}`;
  const known = made.get(key);
  if (known) return known;
  const tree = new CpioTree();
  tree.file("bench/init", new TextEncoder().encode(script), 0o755);
  const extra = tree.bytes();
  const head = await Deno.readFile(base);
  const start = (head.length + 3) & ~3;
  const out = new Uint8Array(start + extra.length);
  out.set(head);
  out.set(extra, start);
  const path = await Deno.makeTempFile({ prefix: "tsvmm-bench-initrd-", suffix: ".cpio" });
  await Deno.writeFile(path, out);
  made.set(key, path);
  return path;
}

/** Removes the initrds benchInitrd made. */
export async function removeBenchInitrds(): Promise<void> {
  for (const p of made.values()) await Deno.remove(p).catch(() => {});
  made.clear();
}
