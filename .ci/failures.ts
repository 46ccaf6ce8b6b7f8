/**
 * Prints a short account of the failed tests in Deno's JUnit report (its path is the first
 * argument), for the end of a CI log: each distinct first line of an error with the tests that
 * failed with it, and the last lines of the first console tail a failure carries. The
 * whole stays under about 60 lines, so a log read from its end shows why the run failed.
 */

const xml = await Deno.readTextFile(Deno.args[0]);
const unescape = (s: string): string =>
  s.replaceAll("&lt;", "<").replaceAll("&gt;", ">").replaceAll("&quot;", '"').replaceAll("&apos;", "'")
    .replaceAll("&amp;", "&");
const clip = (line: string): string => line.length > 220 ? `${line.slice(0, 217)}...` : line;

const failures: Array<{ name: string; lines: string[] }> = [];
for (const m of xml.matchAll(/<testcase name="([^"]*)"[^>]*>\s*<failure message="([^"]*)"/g)) {
  const text = unescape(m[2]).replace(/^Uncaught /, "");
  if (/^\d+ test steps? failed\.?$/.test(text.trim())) continue; // a parent: its steps say why
  failures.push({ name: unescape(m[1]), lines: text.split("\n") });
}
if (failures.length) {
  console.log(`\n=== why ${failures.length} test(s) failed`);
  const byCause = new Map<string, string[]>();
  for (const f of failures) byCause.set(f.lines[0], [...(byCause.get(f.lines[0]) ?? []), f.name]);
  let shown = 0;
  for (const [cause, names] of byCause) {
    if (shown++ === 12) {
      console.log(`  (${byCause.size - 12} more causes)`);
      break;
    }
    console.log(`- ${clip(cause)}`);
    for (const n of names.slice(0, 3)) console.log(`    in: ${clip(n)}`);
    if (names.length > 3) console.log(`    and ${names.length - 3} more`);
  }
  const isTail = (l: string) => /^--- .*(tail|console).* ---$/.test(l);
  const first = failures.find((f) => f.lines.some(isTail));
  if (first) {
    const cut = first.lines.findIndex(isTail);
    console.log(`${clip(first.name)}: ${first.lines[cut]} (its last lines):`);
    for (const l of first.lines.slice(cut + 1).slice(-14)) console.log(`    ${clip(l)}`);
  }
}
