/**
 * An L1 program for the nested runner's own tests (tests/nested/runner_test.ts). With "chatter"
 * it beats once, then prints only lines like those L1's kernel prints while its CPUs are held
 * (a soft lockup report), as a frozen L1 does; with "abandon" it gives up its L1 the way the
 * boot-case program does.
 */

const mode = (await Deno.readTextFile(Deno.args[0])).trim();
if (mode === "abandon") {
  console.log("TSVMM-L1-ALIVE");
  console.log(`TSVMM-L1-ABANDON ${JSON.stringify({ reason: "a vCPU thread did not stop" })}`);
  Deno.exit(3);
}
console.log("TSVMM-L1-ALIVE");
let n = 0;
setInterval(() => {
  n += 1;
  console.log(
    `[ ${100 + n}.000000] watchdog: BUG: soft lockup - CPU#0 stuck for ${22 + n}s! [worker-22:104]`,
  );
}, 1_000);
