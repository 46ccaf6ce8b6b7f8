import { deepEqual, equal } from "node:assert/strict";
import { parseTrace, splitRequests } from "./split_bench.ts";

// Lines as the 6.1 kernel's tracer writes them (times in seconds): vCPU thread 1234, the
// VMM's device thread 2000, a kworker that is not the VMM's.
const exit = (t: number, gpa: string) =>
  ` CPU 0/KVM-1234    [001] d..1.   ${
    t.toFixed(6)
  }: kvm_exit: vcpu 0 reason npf rip 0xffffffff81234567 info1 0x0000000100000006 info2 ${gpa} intr_info 0x00000000 error_code 0x00000000`;
const wake = (t: number, tid: number, comm: string) =>
  `      <idle>-0       [000] d.h2.   ${
    t.toFixed(6)
  }: sched_wakeup: comm=${comm} pid=${tid} prio=110 target_cpu=000`;
const run = (t: number, tid: number) =>
  `      <idle>-0       [000] d..2.   ${
    t.toFixed(6)
  }: sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=worker-1 next_pid=${tid} next_prio=110`;
const accept = (t: number, vec: number) =>
  `    worker-1-2000    [000] d..1.   ${t.toFixed(6)}: kvm_apic_accept_irq: apicid 0 vec ${vec} (Fixed|edge)`;
const halt = (t: number) =>
  ` CPU 0/KVM-1234    [001] d..1.   ${t.toFixed(6)}: kvm_vcpu_wakeup: wait time 310000 ns, polling invalid`;
const entry = (t: number) =>
  ` CPU 0/KVM-1234    [001] d..1.   ${t.toFixed(6)}: kvm_entry: vcpu 0, rip 0xffffffff81234567`;

const NOTIFY = "0x00000000d0001050";
const ISR = "0x00000000d0001060";

Deno.test("rng request split: each request's spans from the notify exit to the next, the device's vector, halts", () => {
  const lines = [
    "# tracer: nop",
    exit(1.0, NOTIFY),
    wake(1.0001, 77, "kworker/0:1"), // not the VMM's: skipped
    wake(1.0002, 2000, "worker-1"),
    run(1.00025, 2000),
    accept(1.0004, 36),
    entry(1.0005),
    exit(1.0006, ISR),
    exit(1.0010, NOTIFY), // request 2: the guest had halted; a timer interrupt comes first
    wake(1.0011, 2000, "worker-1"),
    run(1.0012, 2000),
    accept(1.0013, 236),
    accept(1.0015, 36),
    halt(1.0016),
    entry(1.0018),
    exit(1.0019, ISR),
    exit(1.0030, NOTIFY), // request 3 ends the trace
    wake(1.0031, 2000, "worker-1"),
    run(1.0032, 2000),
    accept(1.0033, 36),
    entry(1.0034),
    exit(1.0035, ISR),
    exit(1.0036, ISR.replace("60", "64")),
  ];
  const s = splitRequests(parseTrace(lines.join("\n")), new Set([1234, 2000]), true);
  equal(s.notify, NOTIFY);
  equal(s.vector, "36");
  equal(s.halted, 1);
  const us = (xs: number[]) => xs.map((x) => Math.round(x));
  deepEqual(us(s.spans["notify exit -> VMM thread woken"]), [200, 100, 100]);
  deepEqual(us(s.spans["woken -> running"]), [50, 100, 100]);
  deepEqual(us(s.spans["running -> interrupt accepted"]), [150, 300, 100]);
  deepEqual(us(s.spans["interrupt -> guest entry"]), [100, 300, 100]);
  deepEqual(us(s.spans["guest: entry -> next notify"]), [500, 1200]);
  deepEqual(us(s.spans.cycle), [1000, 2000]);
});
