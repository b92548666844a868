// The event console's story view in headless Chromium against a real gateway in Redis mode:
// switch the console to "Story progress", watch one story with a token whose `stories`
// claim names it, progress published through `POST /v1/stories/{id}/progress` (the latest
// percent, status, step and time on the card, every message in the log), `status` asked
// again, the current progress first after a reconnect and through a gateway restart
// (reconnecting, then open, with the socket's own backoff), 4003 "Access denied" for a token
// without the story and 4001 for a bad one (a clear message, no retry), then back to the
// project view, which still connects. Leaves a screenshot at
// target/test-artifacts/console-story.png (laptop size, 1366x768).

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { after, before, test } from "node:test";

import {
  SECRET,
  artifactPath,
  freePort,
  launchBrowser,
  startGateway,
  startRedis,
  token,
  watchPage,
} from "./harness.mjs";

const STORY = "7c1e2f4a-58b9-4d3e-a6f0-1b2c3d4e5f60";
const PROJECT = "console-story-demo";

/** HS256 JWT granting stories (docs/protocol.md §9: the `stories` claim), no project. */
function storyToken({ sub = "story-viewer", stories, ttl = 3600, secret = SECRET }) {
  const now = Math.floor(Date.now() / 1000);
  const enc = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const unsigned = `${enc({ alg: "HS256", typ: "JWT" })}.${enc({ sub, iat: now, exp: now + ttl, stories })}`;
  return `${unsigned}.${createHmac("sha256", secret).update(unsigned).digest("base64url")}`;
}

/** POST /v1/stories/{id}/progress with a service token (202). */
async function publishProgress(origin, storyId, progress) {
  const r = await fetch(`${origin}/v1/stories/${storyId}/progress`, {
    method: "POST",
    headers: {
      authorization: `Bearer ${token({ sub: "story-worker", projects: ["*"], service: true })}`,
      "content-type": "application/json",
    },
    body: JSON.stringify({ story_id: storyId, ...progress }),
  });
  const text = await r.text();
  if (r.status !== 202) throw new Error(`progress publish answered ${r.status}: ${text}`);
  return JSON.parse(text);
}

const TOKEN = storyToken({ stories: [STORY] });
let redis;
let gw;
let browser;
let page;
let problems;

before(async () => {
  redis = await startRedis();
  gw = await startGateway({ port: await freePort(), redisUrl: redis.url });
  browser = await launchBrowser();
  const context = await browser.newContext({ viewport: { width: 1366, height: 768 } });
  page = await context.newPage();
  problems = watchPage(page);
  await page.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener("securitypolicyviolation", (e) =>
      window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`),
    );
  });
});

after(async () => {
  await browser?.close();
  await gw?.stop().catch(() => gw.kill());
  await redis?.stop();
});

const statusIs = (state) => page.waitForSelector(`#status[data-state="${state}"]`, { timeout: 15_000 });
const text = (sel) => page.textContent(sel);
const progressRows = () => page.locator('#story-rows tr[data-type="progress"]');
const socketOpens = () => page.locator('#story-rows tr.local', { hasText: "socket open" }).count();

test("switches to the story view, watches a story and shows its latest progress", async () => {
  const response = await page.goto(`${gw.origin}/console`);
  assert.equal(response.status(), 200);
  assert.ok(await page.isVisible("#project-view"), "the project view is the default");
  assert.ok(await page.isHidden("#story-view"));

  await page.click("#mode-story");
  assert.equal(await page.getAttribute("#mode-story", "aria-pressed"), "true");
  assert.equal(await page.getAttribute("#mode-project", "aria-pressed"), "false");
  assert.ok(await page.isVisible("#story-view"));
  assert.ok(await page.isHidden("#project-view"));
  assert.ok(await page.isVisible("#story-id"));
  assert.ok(await page.isHidden("#project"), "the project field gives way to the story field");
  assert.ok(await page.isVisible("#story-empty"));

  await page.fill("#story-id", STORY);
  await page.fill("#token", TOKEN);
  await page.click("#connect");
  await statusIs("open");
  assert.equal(await text("#connect"), "Disconnect");
  assert.match(await text("#conn-info"), new RegExp(`story ${STORY}`));
  assert.equal(await text("#story-title"), `Story ${STORY}`);
  assert.equal(await text("#story-percent"), "–", "nothing published yet");
  assert.ok(await page.isDisabled("#mode-project"), "the view is switched while disconnected only");
  assert.ok(await page.isEnabled("#story-refresh"));

  await publishProgress(gw.origin, STORY, {
    status: "analyzing",
    progress_percent: 20,
    current_step: "Reading the repository",
    updated_at: "2025-01-02T10:00:00Z",
  });
  await page.waitForFunction(() => document.querySelector("#story-percent")?.textContent === "20%");
  assert.equal(await text("#story-status"), "analyzing");

  await publishProgress(gw.origin, STORY, {
    status: "synthesizing",
    progress_percent: 75,
    current_step: "Narrating chapter 2",
    updated_at: "2025-01-02T10:05:00Z",
  });
  await page.waitForFunction(() => document.querySelector("#story-percent")?.textContent === "75%");
  assert.equal(await text("#story-status"), "synthesizing");
  assert.equal(await page.getAttribute("#story-status", "data-status"), "synthesizing");
  assert.equal(await text("#story-step"), "Narrating chapter 2");
  assert.equal(await text("#story-updated"), "2025-01-02T10:05:00Z");
  assert.equal(await page.$eval("#story-bar", (p) => p.value), 75);
  assert.equal(await text("#story-received"), "2 messages");

  // The log: every message, newest first.
  const logged = await progressRows().evaluateAll((trs) => trs.map((tr) => [tr.dataset.status, tr.dataset.percent]));
  assert.deepEqual(logged, [
    ["synthesizing", "75"],
    ["analyzing", "20"],
  ]);
  assert.match(await progressRows().first().textContent(), /Narrating chapter 2/);
  // The latest message in full, as JSON.
  const latest = JSON.parse(await text("#story-json"));
  assert.equal(latest.story_id, STORY);
  assert.equal(latest.progress_percent, 75);

  // "Ask for status" sends the text `status`: the gateway answers with the current progress.
  await page.click("#story-refresh");
  await page.waitForFunction(() => document.querySelectorAll('#story-rows tr[data-type="progress"]').length === 3);
  assert.equal(await progressRows().first().getAttribute("data-percent"), "75");
  await page.screenshot({ path: artifactPath("console-story.png") });
});

test("after disconnect and connect again, the current progress comes first", async () => {
  await page.click("#connect"); // Disconnect
  await statusIs("idle");
  assert.equal(await text("#connect"), "Connect");
  assert.ok(await page.isEnabled("#mode-project"));
  await page.click("#connect");
  await statusIs("open");
  await page.waitForFunction(() => document.querySelector("#story-percent")?.textContent === "75%");
  assert.equal(await text("#story-received"), "1 message");
  assert.equal(await text("#story-step"), "Narrating chapter 2");
});

test("shows reconnecting while the gateway restarts, then open with the current progress", async () => {
  await gw.stop();
  await statusIs("reconnecting");
  assert.match(await text("#status"), /^reconnecting · attempt \d+$/);
  assert.ok(await page.isDisabled("#story-refresh"), "no status request while reconnecting");
  assert.ok(await page.isDisabled("#mode-project"), "still connecting: the view stays");
  const before = await progressRows().count();

  gw = await startGateway({ port: gw.port, redisUrl: redis.url });
  await statusIs("open");
  // Redis kept the story's progress: it comes first on the new socket.
  await page.waitForFunction((n) => document.querySelectorAll('#story-rows tr[data-type="progress"]').length > n, before);
  assert.equal(await text("#story-percent"), "75%");
  assert.match(await text("#conn-info"), /\d+ reconnects?$/);
  await publishProgress(gw.origin, STORY, {
    status: "complete",
    progress_percent: 100,
    current_step: "Done",
    updated_at: "2025-01-02T10:09:00Z",
  });
  await page.waitForFunction(() => document.querySelector("#story-percent")?.textContent === "100%");
  assert.equal(await text("#story-status"), "complete");
  assert.equal(await text("#story-step"), "Done");
});

test("a token without the story shows 4003 Access denied and stops", async () => {
  await page.click("#connect"); // Disconnect
  await statusIs("idle");
  await page.fill("#token", storyToken({ stories: ["some-other-story"] }));
  await page.click("#connect");
  await statusIs("closed");
  assert.equal(await text("#status"), "closed · 4003");
  assert.equal(await text("#form-error"), "Closed with 4003 (Access denied): the token does not grant this story.");
  assert.ok(await page.isVisible("#form-error"));
  assert.equal(await text("#connect"), "Connect");
  assert.ok(await page.isEnabled("#mode-project"));
  const opens = await socketOpens();
  await page.waitForTimeout(1500);
  assert.equal(await socketOpens(), opens, "no retry after 4003");
  assert.equal(await text("#story-percent"), "–", "nothing of the story was shown");
});

test("a token with a bad signature shows 4001 Invalid token", async () => {
  await page.fill("#token", storyToken({ stories: [STORY], secret: "not-the-gateway-secret-0123456789" }));
  await page.click("#connect");
  await statusIs("closed");
  assert.equal(await text("#status"), "closed · 4001");
  assert.match(await text("#form-error"), /^Closed with 4001 \(Invalid token\): the token is missing, invalid or expired\.$/);
});

test("the view and the story id survive a reload; the project view still connects", async () => {
  await page.fill("#token", TOKEN);
  await page.reload();
  assert.equal(await page.getAttribute("#mode-story", "aria-pressed"), "true");
  assert.equal(await page.inputValue("#story-id"), STORY);
  const stored = await page.evaluate(() => JSON.stringify({ ...localStorage, ...sessionStorage }));
  assert.ok(!stored.includes(TOKEN), "the token is not stored unless asked to");

  await page.click("#mode-project");
  assert.ok(await page.isVisible("#project-view"));
  assert.ok(await page.isHidden("#story-view"));
  assert.ok(await page.isVisible("#project"));
  assert.ok(await page.isHidden("#story-id"));
  await page.fill("#project", PROJECT);
  await page.fill("#token", token({ sub: "console-user", projects: [PROJECT] }));
  await page.click("#connect");
  await statusIs("open");
  await page.waitForSelector('#event-rows tr[data-type="connection.established"]');
  assert.match(await text("#conn-info"), new RegExp(`project ${PROJECT} · instance sb-`));
  assert.ok(await page.isDisabled("#mode-story"));
  await page.click("#connect");
  await statusIs("idle");
});

test("no page error and no CSP violation", async () => {
  assert.deepEqual(await page.evaluate(() => window.__cspViolations), []);
  // Chromium logs every refused WebSocket connect as a console error: expected while the
  // gateway was down, and nothing else may appear.
  const unexpected = problems.filter((p) => !/WebSocket connection to .* failed/.test(p));
  assert.deepEqual(unexpected, []);
});
