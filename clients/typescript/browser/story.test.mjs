// Seed 003's Playwright validation gate, unchanged, in a real browser (issue 12): headless
// Chromium opens `/ws/stories/{story_id}/progress?token={jwt}` with the browser's own
// WebSocket, as Code Story's frontend does, against a real gateway and a real Redis. The
// token carries only `sub`; a stand-in app backend (the authorization hook,
// docs/protocol.md §10) says who owns the story. Progress comes from a seed-style Celery
// worker: a plain `PUBLISH story:{id}` of its JSON, which must arrive byte for byte.
//
// Gate: connection accepted; a JSON message with status, progress_percent and
// current_step; "ping" answered by "pong". Then the refusals a frontend sees: another
// user's story closes 4003 "Access denied", and a backend that is down closes 1013.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createServer } from "node:http";
import { after, before, test } from "node:test";

import { launchBrowser, serveTestPage, startGateway, startRedis, token, until, watchPage } from "./harness.mjs";

const STORY = "3b9d6c1e-7a42-4f0b-9c1d-2e8f5a6b7c90";
const HOOK_SECRET = "browser-hook-secret";

let redis;
let gw;
let hook;
let pageServer;
let browser;
let page;
let problems;

/** The stand-in app backend: alice owns STORY; `down` answers 500. */
function startHook() {
  const state = { down: false, asked: [] };
  const server = createServer((req, res) => {
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      const q = JSON.parse(body || "null");
      state.asked.push({ q, auth: req.headers.authorization });
      if (state.down || req.headers.authorization !== `Bearer ${HOOK_SECRET}`) {
        res.writeHead(500).end("down");
        return;
      }
      const owned = q.user_id === "alice" && q.kind === "story" ? [STORY] : [];
      const answer = q.action === "list" ? { ids: owned } : { allow: owned.includes(q.id) };
      res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
    });
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({
        state,
        url: `http://127.0.0.1:${server.address().port}/internal/ws-authz`,
        close: () => new Promise((r) => server.close(r)),
      }),
    ),
  );
}

/** A seed-style Celery worker: `redis.publish(f"story:{id}", json.dumps(progress))`. */
function workerPublish(payload) {
  return new Promise((resolve, reject) =>
    execFile("redis-cli", ["-p", String(redis.port), "PUBLISH", `story:${STORY}`, payload], (e, out) =>
      e ? reject(e) : resolve(Number(out.trim())),
    ),
  );
}

/** Opens a WebSocket in the page the way the seed's frontend does; returns its index. */
const openSocket = (url) =>
  page.evaluate((u) => {
    window.sockets ??= [];
    const entry = { messages: [], open: false, close: null };
    const ws = new WebSocket(u);
    entry.ws = ws;
    ws.onopen = () => (entry.open = true);
    ws.onmessage = (e) => entry.messages.push(e.data);
    ws.onclose = (e) => (entry.close = { code: e.code, reason: e.reason });
    window.sockets.push(entry);
    return window.sockets.length - 1;
  }, url);
const socket = (i) =>
  page.evaluate((n) => {
    const { messages, open, close } = window.sockets[n];
    return { messages, open, close };
  }, i);
const send = (i, text) => page.evaluate(([n, t]) => window.sockets[n].ws.send(t), [i, text]);
const wsUrl = (sub) => `${gw.origin.replace("http", "ws")}/ws/stories/${STORY}/progress?token=${token({ sub })}`;

before(async () => {
  redis = await startRedis();
  hook = await startHook();
  gw = await startGateway({
    redisUrl: redis.url,
    env: { SWITCHBOARD_AUTH_HOOK_URL: hook.url, SWITCHBOARD_AUTH_HOOK_SECRET: HOOK_SECRET },
  });
  browser = await launchBrowser();
  page = await browser.newPage();
  problems = watchPage(page);
  pageServer = await serveTestPage();
  await page.goto(pageServer.origin);
});

after(async () => {
  await browser?.close();
  await pageServer?.close();
  await gw?.stop().catch(() => gw.kill());
  await hook?.close();
  await redis?.stop();
});

test("seed 003 gate: connect with ?token=, receive progress JSON, ping -> pong", async () => {
  const ws = await openSocket(wsUrl("alice"));
  await until("connection accepted", async () => (await socket(ws)).open);
  // The worker's exact bytes (key order, spacing) are what the browser receives.
  const payload = '{"story_id": "' + STORY + '", "status": "generating", "progress_percent": 42, "current_step": "Writing chapter 3"}';
  await until("the gateway subscribed to the story", async () => (await workerPublish(payload)) >= 1);
  const got = await until("a progress message", async () => (await socket(ws)).messages.find((m) => m !== "ping"));
  assert.equal(got, payload, "byte for byte");
  const progress = JSON.parse(got);
  for (const field of ["status", "progress_percent", "current_step"]) assert.ok(field in progress, field);
  await send(ws, "ping");
  await until("pong", async () => (await socket(ws)).messages.includes("pong"));
  assert.deepEqual(hook.state.asked[0].q, { action: "subscribe", user_id: "alice", kind: "story", id: STORY });
  assert.equal(hook.state.asked[0].auth, `Bearer ${HOOK_SECRET}`);
  assert.deepEqual(problems, []);
});

test("another user's story closes 4003 Access denied; a backend that is down closes 1013", async () => {
  const denied = await openSocket(wsUrl("mallory"));
  const close = await until("4003", async () => (await socket(denied)).close);
  assert.deepEqual(close, { code: 4003, reason: "Access denied" });
  assert.deepEqual((await socket(denied)).messages, [], "no frame before the refusal");

  hook.state.down = true;
  // A user the cache has not seen yet: the backend must be asked, and it fails.
  const down = await openSocket(wsUrl("bob"));
  const c = await until("1013", async () => (await socket(down)).close);
  assert.equal(c.code, 1013, "try again later, not a denial");
  hook.state.down = false;
  const metrics = await (await fetch(`${gw.origin}/metrics`)).text();
  assert.match(metrics, /switchboard_auth_hook_failures_total\{reason="status"\} 1/);
});
