#!/usr/bin/env bash
# Browser tests of the TypeScript client and of the event console (browser/*.test.mjs):
# Debian's Chromium driven by playwright-core against real gateways and a private
# redis-server, both started (and stopped, by PID) by browser/harness.mjs.
# scripts/test installs chromium and redis-server when missing and then runs this.
#
# SWITCHBOARD_BIN: the gateway binary (default: `cargo build --bin switchboard`, a no-op
# after `cargo test`). CHROMIUM_PATH: default /usr/bin/chromium.
# The console screenshot is left in target/test-artifacts/console.png
# (SWITCHBOARD_TEST_ARTIFACTS overrides the directory).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [[ ! -x "$chromium" ]]; then
  echo "browser-test.sh: no Chromium at $chromium: run scripts/test (it installs it)," \
       "or 'apt-get install -y chromium', or set CHROMIUM_PATH" >&2
  exit 1
fi
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "browser-test.sh: redis-server/redis-cli not found: run scripts/test (it installs them)" >&2
  exit 1
fi
if [[ ! -d node_modules/playwright-core || ! -d node_modules/esbuild ]]; then
  npm ci --no-audit --no-fund
fi

if [[ -z "${SWITCHBOARD_BIN:-}" ]]; then
  # The executable path from cargo itself, wherever the target directory is.
  SWITCHBOARD_BIN="$(
    cd ../.. && cargo build --bin switchboard --message-format=json-render-diagnostics |
      node -e '
        let exe = "";
        require("readline").createInterface({ input: process.stdin }).on("line", (l) => {
          try {
            const m = JSON.parse(l);
            if (m.reason === "compiler-artifact" && m.target?.name === "switchboard" && m.executable) exe = m.executable;
          } catch {}
        }).on("close", () => console.log(exe));'
  )"
fi
if [[ ! -x "$SWITCHBOARD_BIN" ]]; then
  echo "browser-test.sh: gateway binary not found (SWITCHBOARD_BIN=$SWITCHBOARD_BIN)" >&2
  exit 1
fi
export SWITCHBOARD_BIN CHROMIUM_PATH="$chromium"

# One file at a time: each starts its own gateways and browser on a 2-core machine.
exec node --test --test-concurrency=1 browser/
