// Builds the browser files the gateway embeds (src/console.rs) from the TypeScript sources:
//   console/switchboard-client.js  the client (src/index.ts) as one ES module
//   console/console.js             the console page (console/console.ts), importing the above
// Both are committed so that `cargo build` needs no Node; `--check` rebuilds in memory and
// fails when a committed file differs (clients/typescript/test.sh runs it), which is what
// keeps them fresh. esbuild is pinned by package-lock.json: its output is byte-stable.
//
//   node scripts/bundle.mjs          write the files
//   node scripts/bundle.mjs --check  compare only; exit 1 when stale

import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../../..");
const clientEntry = path.join(repo, "clients/typescript/src/index.ts");
const outDir = path.join(repo, "console");

const banner = (what) =>
  `// GENERATED from ${what} by clients/typescript/scripts/bundle.mjs. Do not edit:\n` +
  `// run \`npm run bundle\` in clients/typescript (the tests fail while this file is stale).`;

/** The console imports the client's sources for their types; at run time it loads the
 * separately served bundle instead of a second copy. */
const clientAsExternal = {
  name: "client-as-external",
  setup(build) {
    build.onResolve({ filter: /clients\/typescript\/src\/index\.js$/ }, () => ({
      path: "./switchboard-client.js",
      external: true,
    }));
  },
};

const common = {
  bundle: true,
  format: "esm",
  target: "es2022",
  platform: "browser",
  write: false,
  // Paths in the output's comments are relative to the repository, not to this machine.
  absWorkingDir: repo,
  logLevel: "warning",
  charset: "utf8",
  legalComments: "none",
};

/** Builds one file in memory: [output path, text]. */
async function build(entry, outName, what, plugins = []) {
  const result = await esbuild.build({
    ...common,
    entryPoints: [entry],
    outfile: path.join(outDir, outName),
    banner: { js: banner(what) },
    plugins,
  });
  const [file] = result.outputFiles;
  return [file.path, file.text];
}

export async function bundles() {
  return Promise.all([
    build(clientEntry, "switchboard-client.js", "clients/typescript/src"),
    build(path.join(repo, "console/console.ts"), "console.js", "console/console.ts", [clientAsExternal]),
  ]);
}

async function main() {
  const check = process.argv.includes("--check");
  let stale = 0;
  for (const [file, text] of await bundles()) {
    const rel = path.relative(repo, file);
    if (check) {
      const committed = await readFile(file, "utf8").catch(() => null);
      if (committed !== text) {
        stale += 1;
        console.error(
          `${rel} is ${committed === null ? "missing" : "stale"}: ` +
            "run `npm run bundle` in clients/typescript and commit it",
        );
      }
    } else {
      await writeFile(file, text);
      console.log(`wrote ${rel} (${text.length} bytes)`);
    }
  }
  if (stale > 0) process.exit(1);
  if (check) console.log("console bundles are fresh");
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await main();
}
