/** Command-line options that switch VMM behaviour reach the resolved config. */

import assert from "node:assert/strict";
import { parseCli } from "../../vmm/cli.ts";
import { resolveConfig } from "../../vmm/config.ts";

Deno.test("cli: virtio-MMIO register pages are on by default; --no-mmio-register-pages turns them off", () => {
  const on = resolveConfig(parseCli(["--kernel", "/k"])!);
  assert.equal(on.mmioRegisterPages, true);
  const off = resolveConfig(parseCli(["--kernel", "/k", "--no-mmio-register-pages"])!);
  assert.equal(off.mmioRegisterPages, false);
  assert.equal(on.deviceThread, true);
  assert.equal(resolveConfig(parseCli(["--kernel", "/k", "--no-device-thread"])!).deviceThread, false);
});
