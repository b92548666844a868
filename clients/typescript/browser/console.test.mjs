// The event console (issue 6, part 2) in headless Chromium against a real gateway in Redis
// mode: connect with a project and a token, events live, type filter, pause and resume,
// one event's details, a node.execute answered by command.accepted, the status badge
// through a gateway restart (reconnecting, then open, nothing lost), 4001, and the token
// kept out of the URL and of storage. Leaves a screenshot at
// target/test-artifacts/console.png (laptop size, 1366x768).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  artifactPath,
  fileChanged,
  freePort,
  launchBrowser,
  nodeState,
  publish,
  redisSubscribe,
  startGateway,
  startRedis,
  taskProgress,
  token,
  until,
  watchPage,
} from "./harness.mjs";

const PROJECT = "console-demo";
const TOKEN = token({ sub: "console-user", projects: [PROJECT] });
let redis;
let gw;
let publisher;
let browser;
let page;
let problems;

before(async () => {
  redis = await startRedis();
  gw = await startGateway({ port: await freePort(), redisUrl: redis.url });
  publisher = await startGateway({ redisUrl: redis.url });
  browser = await launchBrowser();
  const context = await browser.newContext({
    viewport: { width: 1366, height: 768 },
    permissions: ["clipboard-read", "clipboard-write"],
  });
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
  await publisher?.stop().catch(() => publisher.kill());
  await redis?.stop();
});

const rowCount = () => page.locator("#event-rows tr").count();
const shownSeqs = async () =>
  (await page.locator("#event-rows tr[data-seq]").evaluateAll((trs) => trs.map((tr) => Number(tr.dataset.seq)))).sort(
    (a, b) => a - b,
  );
const statusIs = (state) => page.waitForSelector(`#status[data-state="${state}"]`, { timeout: 15_000 });

test("the gateway serves the console, and it connects with a project and a token", async () => {
  const response = await page.goto(`${gw.origin}/console`);
  assert.equal(response.status(), 200);
  assert.match(response.headers()["content-security-policy"], /script-src 'self'/);
  assert.equal(await page.inputValue("#gateway"), gw.origin, "the gateway defaults to the page's origin");
  assert.equal(await page.textContent("#status"), "disconnected");
  assert.ok(await page.isDisabled("#send"), "no command before a connection");

  await page.fill("#project", PROJECT);
  await page.fill("#token", TOKEN);
  await page.click("#connect");
  await statusIs("open");
  assert.equal(await page.textContent("#status"), "open");
  assert.equal(await page.textContent("#connect"), "Disconnect");
  assert.match(await page.textContent("#conn-info"), new RegExp(`project ${PROJECT} · instance sb-`));
  await page.waitForSelector('#event-rows tr[data-type="connection.established"]');
  await page.waitForSelector('#event-rows tr[data-type="status"]');

  // The token stays in memory: not in the URL, not in storage (the user did not opt in).
  assert.ok(!page.url().includes(TOKEN.slice(0, 20)), page.url());
  const stored = await page.evaluate(() => JSON.stringify({ ...localStorage, ...sessionStorage }));
  assert.ok(!stored.includes(TOKEN), stored);
  assert.match(stored, new RegExp(PROJECT), "the project is remembered, it is not a secret");
});

test("events appear live; the type filter narrows them; a click shows one in full", async () => {
  await publish(gw.origin, PROJECT, [
    nodeState("render-1", "queued"),
    nodeState("render-1", "processing"),
    taskProgress("task-9", 45),
    taskProgress("task-9", 80),
    fileChanged(5),
  ]);
  await page.waitForSelector('#event-rows tr[data-seq="5"]');
  assert.deepEqual(await shownSeqs(), [1, 2, 3, 4, 5]);
  const summary = await page.textContent('#event-rows tr[data-seq="3"] .c-summary');
  assert.match(summary, /task_id task-9/);
  assert.match(summary, /progress 45%/);

  await page.fill("#filter", "task.");
  const types = await page.locator("#event-rows tr").evaluateAll((trs) => trs.map((tr) => tr.dataset.type));
  assert.deepEqual(types, ["task.progress", "task.progress"]);
  assert.match(await page.textContent("#count"), /^2 of \d+ events/);
  await page.fill("#filter", "-node -client -connection -status");
  assert.deepEqual(await shownSeqs(), [3, 4, 5]);
  await page.fill("#filter", "");
  assert.deepEqual(await shownSeqs(), [1, 2, 3, 4, 5]);

  await page.click('#event-rows tr[data-seq="3"]');
  assert.equal(await page.getAttribute('#event-rows tr[data-seq="3"]', "aria-selected"), "true");
  assert.equal(await page.textContent("#details-title"), "task.progress · seq 3");
  const details = await page.textContent("#details");
  assert.match(details, /"task_id": "task-9"/);
  assert.match(details, /"percentage": 45/);
  assert.deepEqual(JSON.parse(details).progress.percentage, 45, "the details are the event's JSON");

  await page.click("#copy");
  await page.waitForFunction(() => document.querySelector("#copy")?.textContent === "Copied");
  const copied = JSON.parse(await page.evaluate(() => navigator.clipboard.readText()));
  assert.equal(copied.seq, 3, "Copy JSON copies the selected event");

  // The keyboard walks the list (newest first: below seq 3 is seq 2).
  await page.focus("#table-wrap");
  await page.keyboard.press("ArrowDown");
  assert.equal(await page.textContent("#details-title"), "node.state.updated · seq 2");
  await page.keyboard.press("ArrowUp");
  assert.equal(await page.textContent("#details-title"), "task.progress · seq 3");
});

test("pause holds new events (the list stays still) and resume shows them", async () => {
  await page.click("#pause");
  assert.equal(await page.getAttribute("#pause", "aria-pressed"), "true");
  const before = await rowCount();
  await publish(gw.origin, PROJECT, [fileChanged(6), fileChanged(7), fileChanged(8)]);
  await page.waitForFunction(() => document.querySelector("#pause")?.textContent === "Resume (3 new)");
  assert.equal(await rowCount(), before, "nothing was added while paused");
  await page.click("#pause");
  await page.waitForSelector('#event-rows tr[data-seq="8"]');
  assert.equal(await rowCount(), before + 3);
  assert.equal(await page.textContent("#pause"), "Pause");
  assert.equal(await page.getAttribute('#event-rows tr[data-seq="3"]', "aria-selected"), "true", "selection kept");
});

test("sends node.execute and shows the command.accepted reply", async () => {
  const worker = await redisSubscribe(redis.port, `project:${PROJECT}:commands`);
  try {
    await page.selectOption("#command-type", "node.execute");
    await page.fill("#node-id", "render-1");
    await page.fill("#parameters", "{not json");
    await page.click("#send");
    await page.waitForSelector('#command-result[data-state="error"]');
    assert.match(await page.textContent("#command-outcome"), /parameters are not JSON/);

    await page.fill("#parameters", '{"steps": 30, "seed": 7}');
    await page.click("#send");
    await page.waitForSelector('#command-result[data-state="ok"]');
    assert.equal(await page.textContent("#command-outcome"), "✓ node.execute accepted · delivered to 1 worker");
    const reply = JSON.parse(await page.textContent("#command-reply"));
    assert.equal(reply.type, "command.accepted");
    assert.equal(reply.delivered_to, 1);
    await until("the relayed command", () => worker.messages.length > 0, 5000);
    assert.equal(worker.messages[0].type, "execute_node");
    assert.equal(worker.messages[0].node_id, "render-1");
    assert.deepEqual(worker.messages[0].parameters, { steps: 30, seed: 7 });
    assert.equal(worker.messages[0].request_id, reply.request_id);
    await page.waitForSelector('#event-rows tr[data-type="command.accepted"]');

    // task.cancel swaps the fields.
    await page.selectOption("#command-type", "task.cancel");
    assert.ok(await page.isHidden("#node-id"));
    await page.fill("#task-id", "task-9");
    await page.click("#send");
    await page.waitForFunction(() => document.querySelector("#command-outcome")?.textContent?.startsWith("✓ task.cancel"));
    await until("the relayed cancel", () => worker.messages.length > 1, 5000);
    assert.equal(worker.messages[1].type, "cancel_task");
    assert.equal(worker.messages[1].task_id, "task-9");
    await page.selectOption("#command-type", "node.execute");
  } finally {
    await worker.close();
  }
});

test("shows reconnecting while the gateway restarts, then open, with no event lost", async () => {
  await gw.stop();
  await statusIs("reconnecting");
  assert.match(await page.textContent("#status"), /^reconnecting · attempt \d+$/);
  assert.ok(await page.isDisabled("#send"), "no command while reconnecting");
  await publish(publisher.origin, PROJECT, [taskProgress("task-9", 95), nodeState("render-1", "completed")]);

  gw = await startGateway({ port: gw.port, redisUrl: redis.url });
  await statusIs("open");
  await page.waitForSelector('#event-rows tr[data-seq="10"]');
  assert.match(await page.textContent("#conn-info"), /\d+ reconnects?$/);
  assert.deepEqual(await shownSeqs(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "every event once, resumed across the restart");
  await page.waitForSelector('#event-rows tr[data-type="client.reconnecting"]');

  // The picture a person would see: a selected event, the last command's reply.
  await page.click('#event-rows tr[data-seq="9"]');
  await page.fill("#node-id", "render-2");
  await page.fill("#parameters", '{"steps": 30}');
  await page.click("#send");
  await page.waitForSelector('#command-result[data-state="ok"]');
  await page.screenshot({ path: artifactPath("console.png") });
});

test("a refused token shows the close code and stops", async () => {
  await page.click("#connect"); // Disconnect
  await statusIs("idle");
  await page.fill("#token", token({ projects: [PROJECT], secret: "not-the-gateway-secret-0123456789" }));
  await page.click("#connect");
  await statusIs("closed");
  assert.equal(await page.textContent("#status"), "closed · 4001");
  assert.match(await page.textContent("#form-error"), /4001: the token is missing, invalid or expired/);
  assert.equal(await page.textContent("#connect"), "Connect");
  const opens = await page.locator('#event-rows tr[data-type="client.open"]').count();
  await page.waitForTimeout(1500);
  assert.equal(await page.locator('#event-rows tr[data-type="client.open"]').count(), opens, "no retry after 4001");
});

test("keeps the token for the tab only when asked to", async () => {
  await page.fill("#token", TOKEN);
  await page.check("#remember");
  await page.click("#connect");
  await statusIs("open");
  assert.equal(await page.evaluate(() => sessionStorage.getItem("switchboard.console.token")), TOKEN);
  await page.reload();
  assert.equal(await page.inputValue("#token"), TOKEN, "restored in the same tab");
  assert.ok(await page.isChecked("#remember"));
  await page.uncheck("#remember");
  assert.equal(await page.evaluate(() => sessionStorage.getItem("switchboard.console.token")), null);
  const local = await page.evaluate(() => JSON.stringify({ ...localStorage }));
  assert.ok(!local.includes(TOKEN), "never in localStorage");
});

test("no page error and no CSP violation", async () => {
  assert.deepEqual(await page.evaluate(() => window.__cspViolations), []);
  // Chromium logs every refused WebSocket connect as a console error: expected while the
  // gateway was down, and nothing else may appear.
  const unexpected = problems.filter((p) => !/WebSocket connection to .* failed/.test(p));
  assert.deepEqual(unexpected, []);
});
