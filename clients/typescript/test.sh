#!/usr/bin/env bash
# Builds, typechecks and unit-tests the TypeScript client, and checks that the browser
# bundles committed in console/ (embedded by the gateway) match the sources. Callable from
# anywhere (e.g. the repository root: clients/typescript/test.sh). The browser tests are
# browser-test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [[ -f package-lock.json ]]; then
  npm ci --no-audit --no-fund
else
  npm install --no-audit --no-fund
fi
npm run typecheck
npm test
npm run bundle:check
