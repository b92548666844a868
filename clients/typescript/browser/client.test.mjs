// The TypeScript client in a real browser (issue 6, part 1): headless Chromium loads a test
// page that imports the client's browser bundle (console/switchboard-client.js, the file the
// gateway serves) and drives it through browser/page.ts. Against a real
// gateway in Redis mode: typed events, resume across a gateway restart with nothing lost,
// node.execute answered by command.accepted, and 4001/4003 stopping without a retry loop.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  fileChanged,
  freePort,
  launchBrowser,
  nodeState,
  publish,
  redisSubscribe,
  serveTestPage,
  sleep,
  startGateway,
  startRedis,
  taskProgress,
  token,
  until,
  watchPage,
} from "./harness.mjs";

const PROJECT = "browser-client";
let redis;
let gw;
/** A second instance on the same Redis: publishes while `gw` is down, as a worker would. */
let publisher;
let pageServer;
let browser;
let page;
let problems;

const sb = (fn, ...args) => page.evaluate(([name, a]) => window.sbTest[name](...a), [fn, args]);
/** Opens a named client in the page against the current `gw`. */
const open = (name, project, jwt) => sb("open", name, gw.origin, project, jwt);

before(async () => {
  redis = await startRedis();
  gw = await startGateway({ port: await freePort(), redisUrl: redis.url });
  publisher = await startGateway({ redisUrl: redis.url });
  browser = await launchBrowser();
  page = await browser.newPage();
  problems = watchPage(page);
  pageServer = await serveTestPage();
  await page.goto(pageServer.origin);
  await page.waitForFunction(() => document.body.dataset.ready === "true", null, { timeout: 10_000 });
});

after(async () => {
  await browser?.close();
  await pageServer?.close();
  await gw?.stop().catch(() => gw.kill());
  await publisher?.stop().catch(() => publisher.kill());
  await redis?.stop();
});

/** Replies and connection frames: their `seq` is the project's position, not an event's. */
const NOT_EVENTS = new Set(["connection.established", "status", "system.heartbeat", "command.accepted", "pong"]);

/** Seqs of the project events the named client delivered, in order. */
async function seqs(name) {
  const frames = await sb("frames", name);
  return frames.filter((f) => typeof f.seq === "number" && !NOT_EVENTS.has(f.type)).map((f) => f.seq);
}

test("connects with a token and receives typed events", async () => {
  await open("main", PROJECT, token({ projects: [PROJECT] }));
  await until("main connected", async () => (await sb("state", "main")) === "connected");
  const published = await publish(gw.origin, PROJECT, [
    nodeState("n1", "processing"),
    taskProgress("t1", 40),
    fileChanged(1),
  ]);
  assert.deepEqual(published, [1, 2, 3]);
  const typed = await until("three typed events", async () => {
    const t = await sb("typed", "main");
    return t.length >= 3 && t;
  });
  assert.deepEqual(typed, [
    { type: "node.state.updated", seq: 1, node_id: "n1", state: "processing" },
    { type: "task.progress", seq: 2, task_id: "t1", percentage: 40, step: "step 40" },
    { type: "file.changed", seq: 3, file_path: "/w/1.txt" },
  ]);
  const frames = await sb("frames", "main");
  assert.equal(frames[0].type, "connection.established");
  assert.equal(frames[1].type, "status", "a fresh connection gets the status snapshot");
});

test("reconnects and resumes after the gateway restarts, losing nothing", async () => {
  await publish(gw.origin, PROJECT, [fileChanged(4), fileChanged(5), fileChanged(6)]);
  await until("seq 6 before the restart", async () => (await seqs("main")).includes(6));

  const restartAt = (await sb("lifecycle", "main")).length;
  await gw.stop(); // SIGTERM: container.reconnect, close 1012, exit 0
  await until("the client to see the 1012 close", async () =>
    (await sb("lifecycle", "main")).slice(restartAt).some((l) => l.name === "close" && l.payload.code === 1012),
  );
  assert.equal(await sb("state", "main"), "reconnecting");
  // Published while the page's gateway is down: only history can bring these back.
  const down = await publish(publisher.origin, PROJECT, [7, 8, 9, 10, 11].map((n) => fileChanged(n)));
  assert.deepEqual(down, [7, 8, 9, 10, 11]);
  await sleep(300); // let a reconnect attempt or two fail against the closed port

  gw = await startGateway({ port: gw.port, redisUrl: redis.url });
  await until("reconnected", async () => (await sb("state", "main")) === "connected", 15_000);
  await publish(gw.origin, PROJECT, [fileChanged(12), fileChanged(13), fileChanged(14)]);
  await until("seq 14 after the restart", async () => (await seqs("main")).includes(14));
  await sleep(200); // a duplicate would arrive right behind

  const all = await seqs("main");
  assert.deepEqual(all, Array.from({ length: 14 }, (_, i) => i + 1), "every seq once, in order");
  const established = (await sb("frames", "main")).filter((f) => f.type === "connection.established");
  assert.equal(established.length, 2);
  assert.equal(established[1].resumed, true, "the second connection resumed from last_seq");
  const lifecycle = (await sb("lifecycle", "main")).slice(restartAt).map((l) => l.name);
  assert.ok(lifecycle.includes("reconnecting"), lifecycle.join(","));
  assert.ok(!lifecycle.includes("stopped"), lifecycle.join(","));
});

test("node.execute resolves with command.accepted and reaches the workers' channel", async () => {
  const worker = await redisSubscribe(redis.port, `project:${PROJECT}:commands`);
  try {
    const reply = await sb("execute", "main", "node-7", { steps: 3 });
    assert.equal(reply.type, "command.accepted", JSON.stringify(reply));
    assert.equal(reply.command, "node.execute");
    assert.equal(reply.request_id, "req-node-7");
    assert.equal(reply.delivered_to, 1, "one subscriber (this test's) received it");
    await until("the relayed command", () => worker.messages.length > 0, 5000);
    const cmd = worker.messages[0];
    assert.equal(cmd.type, "execute_node");
    assert.equal(cmd.node_id, "node-7");
    assert.deepEqual(cmd.parameters, { steps: 3 });
    assert.equal(cmd.request_id, "req-node-7");
    assert.equal(cmd.project_id, PROJECT);
  } finally {
    await worker.close();
  }
});

test("stops on 4001 (bad or expired token) and 4003 (project not granted), without retrying", async () => {
  await open("forged", PROJECT, token({ projects: [PROJECT], secret: "not-the-gateway-secret-0123456789" }));
  await open("expired", PROJECT, token({ projects: [PROJECT], ttl: -60 }));
  await open("forbidden", PROJECT, token({ projects: ["another-project"] }));
  const expect = { forged: [4001, "unauthenticated"], expired: [4001, "unauthenticated"], forbidden: [4003, "forbidden"] };
  for (const [name, [code, reason]] of Object.entries(expect)) {
    const stopped = await until(`${name} stopped`, async () =>
      (await sb("lifecycle", name)).find((l) => l.name === "stopped"),
    );
    assert.deepEqual(stopped.payload, { reason, code }, name);
  }
  // Backoff starts at 200 ms here: a client that retried would have reconnected by now.
  await sleep(1500);
  for (const name of Object.keys(expect)) {
    const names = (await sb("lifecycle", name)).map((l) => l.name);
    assert.equal(names.filter((n) => n === "open").length, 1, `${name}: ${names.join(",")}`);
    assert.ok(!names.includes("reconnecting"), `${name}: ${names.join(",")}`);
    assert.equal(await sb("state", name), "stopped");
  }
});

test("the page logged no error", () => {
  // Chromium logs every refused WebSocket connect as a console error: expected while the
  // gateway was down, and nothing else may appear.
  const unexpected = problems.filter((p) => !/WebSocket connection to .* failed/.test(p));
  assert.deepEqual(unexpected, []);
});
