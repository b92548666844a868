// Shared pieces of the browser tests (browser/*.test.mjs): a private redis-server and real
// gateways (the `switchboard` binary) on free ports, tokens, the publish API, a Redis
// subscriber, and Debian's Chromium driven by playwright-core (no browser download).
//
// Every process is started here and stopped by its own PID (also when a test fails or the
// runner exits); nothing touches a Redis or gateway somebody else started. Every wait has a
// deadline, so a broken gateway fails a test instead of hanging it.
//
// Environment: SWITCHBOARD_BIN (the gateway binary; browser-test.sh sets it),
// CHROMIUM_PATH (default /usr/bin/chromium), SWITCHBOARD_TEST_ARTIFACTS (screenshots;
// default <repo>/target/test-artifacts).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const repo = path.resolve(here, "../../..");
export const SECRET = "switchboard-browser-test-secret-0123456789";

export const artifactsDir = process.env.SWITCHBOARD_TEST_ARTIFACTS || path.join(repo, "target/test-artifacts");

const children = new Set();
process.on("exit", () => {
  for (const child of children) {
    try {
      child.kill("SIGKILL");
    } catch {
      /* already gone */
    }
  }
});

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value; throws `what` with the last value after `ms`. */
export async function until(what, fn, ms = 10_000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
    await sleep(50);
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function waitExit(child, ms) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    child.once("exit", () => {
      clearTimeout(t);
      resolve(true);
    });
  });
}

/** Keeps the last lines of a child's output, for error messages. */
function tail(stream, lines, max = 200) {
  let partial = "";
  stream.setEncoding("utf8");
  stream.on("data", (chunk) => {
    const parts = (partial + chunk).split("\n");
    partial = parts.pop() ?? "";
    for (const l of parts) {
      lines.push(l);
      if (lines.length > max) lines.shift();
    }
  });
}

// ---- redis-server ----------------------------------------------------------------------

export async function startRedis() {
  const port = await freePort();
  const dir = mkdtempSync(path.join(tmpdir(), "switchboard-browser-redis-"));
  const child = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  children.add(child);
  const spawnError = new Promise((_, reject) => child.once("error", reject));
  const ping = async () => {
    const out = await run("redis-cli", ["-p", String(port), "PING"]).catch(() => "");
    return out.trim() === "PONG";
  };
  await Promise.race([until("redis-server PONG", ping, 10_000), spawnError]);
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      child.kill("SIGKILL");
      await waitExit(child, 5000);
      children.delete(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function run(cmd, args) {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    c.stdout.setEncoding("utf8");
    c.stdout.on("data", (d) => (out += d));
    c.on("error", reject);
    c.on("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} exited ${code}`))));
  });
}

/** `SUBSCRIBE channel` through redis-cli; `messages` collects the parsed JSON payloads. */
export async function redisSubscribe(port, channel) {
  const child = spawn("redis-cli", ["-p", String(port), "SUBSCRIBE", channel], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  children.add(child);
  const messages = [];
  let subscribed = false;
  const lines = [];
  // Piped, redis-cli prints each reply element on its own line and flushes per reply:
  // `subscribe` `channel` `1`, then `message` `channel` `payload` for every message.
  tail(child.stdout, lines, Infinity);
  const parse = () => {
    while (lines.length >= 3) {
      const [kind, , value] = lines.splice(0, 3);
      if (kind === "subscribe") subscribed = true;
      else if (kind === "message") messages.push(JSON.parse(value));
    }
  };
  child.stdout.on("data", () => setImmediate(parse));
  await until(`SUBSCRIBE ${channel}`, () => subscribed, 5000);
  return {
    messages,
    async close() {
      child.kill("SIGKILL");
      await waitExit(child, 5000);
      children.delete(child);
    },
  };
}

// ---- gateway ---------------------------------------------------------------------------

export function gatewayBin() {
  const bin = process.env.SWITCHBOARD_BIN;
  if (!bin || !existsSync(bin)) {
    throw new Error(
      `SWITCHBOARD_BIN=${bin ?? "(unset)"} is not a built gateway: run clients/typescript/browser-test.sh ` +
        "(it builds the binary and sets SWITCHBOARD_BIN)",
    );
  }
  return bin;
}

/** Environment variables the gateway reads: never inherited from the developer's shell. */
const GATEWAY_ENV = [
  "REDIS_URL",
  "SWITCHBOARD_LISTEN",
  "SWITCHBOARD_JWT_SECRET",
  "SWITCHBOARD_JWT_PUBLIC_KEY_FILE",
  "WS_HEARTBEAT_INTERVAL",
  "WS_IDLE_TIMEOUT",
  "ENVIRONMENT",
  "DOMAIN",
  "BACKEND_HOST",
  "BACKEND_PORT",
  "CONTAINER_ID",
  "SWITCHBOARD_SHUTDOWN_GRACE",
  "SWITCHBOARD_CONSOLE",
  "SWITCHBOARD_LOG_FORMAT",
  "SWITCHBOARD_AUTH_HOOK_URL",
  "SWITCHBOARD_AUTH_HOOK_SECRET",
];

/**
 * Starts `switchboard serve` on `port` (a free one when omitted) and waits for /readyz.
 * Returns { port, origin, stop(), kill(), logs }; `stop` is SIGTERM and waits for exit 0.
 */
export async function startGateway({ port, redisUrl, env = {} } = {}) {
  const listenPort = port ?? (await freePort());
  const childEnv = { ...process.env };
  for (const k of GATEWAY_ENV) delete childEnv[k];
  Object.assign(childEnv, {
    SWITCHBOARD_LISTEN: `127.0.0.1:${listenPort}`,
    SWITCHBOARD_JWT_SECRET: SECRET,
    ENVIRONMENT: "development",
    SWITCHBOARD_SHUTDOWN_GRACE: "3",
    RUST_LOG: "info",
    ...(redisUrl ? { REDIS_URL: redisUrl } : {}),
    ...env,
  });
  const child = spawn(gatewayBin(), ["serve"], { env: childEnv, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  const logs = [];
  tail(child.stdout, logs);
  tail(child.stderr, logs);
  const origin = `http://127.0.0.1:${listenPort}`;
  const exited = new Promise((resolve) => child.once("exit", (code, sig) => resolve({ code, sig })));
  const ready = until(
    "gateway /readyz 200",
    async () => {
      try {
        return (await fetch(`${origin}/readyz`)).status === 200;
      } catch {
        return false;
      }
    },
    15_000,
  );
  const outcome = await Promise.race([ready.then(() => null), exited]);
  if (outcome) {
    children.delete(child);
    throw new Error(`gateway exited at start (${JSON.stringify(outcome)}):\n${logs.join("\n")}`);
  }
  return {
    port: listenPort,
    origin,
    logs,
    pid: child.pid,
    /** SIGTERM (drain: container.reconnect then 1012), then waits for the exit. */
    async stop() {
      child.kill("SIGTERM");
      if (!(await waitExit(child, 10_000))) {
        child.kill("SIGKILL");
        await waitExit(child, 5000);
        throw new Error(`gateway did not exit within 10 s of SIGTERM:\n${logs.join("\n")}`);
      }
      children.delete(child);
      if (child.exitCode !== 0) throw new Error(`gateway exited ${child.exitCode} after SIGTERM:\n${logs.join("\n")}`);
    },
    async kill() {
      child.kill("SIGKILL");
      await waitExit(child, 5000);
      children.delete(child);
    },
  };
}

// ---- tokens and publishing -------------------------------------------------------------

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** HS256 JWT signed with `secret` (default the suite's); `ttl` may be negative (expired). */
export function token({ sub = "browser", projects, ttl = 3600, service = false, secret = SECRET }) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub, iat: now, exp: now + ttl, projects };
  if (service) claims.role = "service";
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** POST /v1/projects/{project}/events with a service token; returns the seqs. */
export async function publish(origin, project, events) {
  const r = await fetch(`${origin}/v1/projects/${project}/events`, {
    method: "POST",
    headers: {
      authorization: `Bearer ${token({ sub: "browser-test-worker", projects: ["*"], service: true })}`,
      "content-type": "application/json",
    },
    body: JSON.stringify(events),
  });
  const text = await r.text();
  if (r.status !== 202) throw new Error(`publish answered ${r.status}: ${text}`);
  return JSON.parse(text).seq;
}

let fileCounter = 0;
export const fileChanged = (n = ++fileCounter) => ({
  type: "file.changed",
  file_path: `/w/${n}.txt`,
  change_type: "modified",
});
export const nodeState = (node, state) => ({ type: "node.state.updated", node_id: node, state });
export const taskProgress = (task, pct) => ({
  type: "task.progress",
  task_id: task,
  node_id: "n1",
  progress: { percentage: pct, current_step: pct, total_steps: 100, step_description: `step ${pct}` },
});

// ---- browser ---------------------------------------------------------------------------

export const chromiumPath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

export async function launchBrowser() {
  if (!existsSync(chromiumPath)) {
    throw new Error(
      `no Chromium at ${chromiumPath}: run scripts/test (it installs Debian's chromium) ` +
        "or `apt-get install -y chromium`, or set CHROMIUM_PATH",
    );
  }
  return chromium.launch({
    executablePath: chromiumPath,
    // --no-sandbox: the tests run as root in CI, where Chromium's sandbox cannot start.
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
}

/** Fails a test on any page error, console error or CSP violation. */
export function watchPage(page) {
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console.error: ${m.text()}`);
  });
  return problems;
}

/** browser/page.ts compiled for the browser, importing the client as ./switchboard-client.js. */
async function testPageScript() {
  const result = await esbuild.build({
    entryPoints: [path.join(here, "page.ts")],
    bundle: true,
    format: "esm",
    target: "es2022",
    write: false,
    logLevel: "warning",
    plugins: [
      {
        name: "served-client",
        setup(build) {
          build.onResolve({ filter: /\/src\/index\.js$/ }, () => ({ path: "./switchboard-client.js", external: true }));
        },
      },
    ],
  });
  return result.outputFiles[0].text;
}

/**
 * Serves the client's test page on its own origin (127.0.0.1, another port than any
 * gateway), as an application embedding the client would: the page, its program
 * (browser/page.ts) and console/switchboard-client.js, the very file the gateway embeds.
 * A page of its own also survives the gateway restarts the tests cause.
 */
export async function serveTestPage() {
  const files = {
    "/": ["text/html", '<!doctype html><title>client test</title><link rel="icon" href="data:,"><script type="module" src="/page.js"></script>'],
    "/page.js": ["text/javascript", await testPageScript()],
    "/switchboard-client.js": ["text/javascript", readFileSync(path.join(repo, "console/switchboard-client.js"), "utf8")],
  };
  const server = createHttpServer((req, res) => {
    const file = files[new URL(req.url ?? "/", "http://x").pathname];
    res.writeHead(file ? 200 : 404, { "content-type": file ? `${file[0]}; charset=utf-8` : "text/plain" });
    res.end(file ? file[1] : "not found");
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    origin: `http://127.0.0.1:${server.address().port}`,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

export function artifactPath(name) {
  mkdirSync(artifactsDir, { recursive: true });
  return path.join(artifactsDir, name);
}
