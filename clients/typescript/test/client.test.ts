import { describe, it } from "node:test";
import assert from "node:assert/strict";

import { SwitchboardClient, SwitchboardError, closeAction, type ServerMessage } from "../src/index.js";
import { FakeWebSocket, PROJECT, established, event, flush, setup } from "./helpers.js";

describe("backoff", () => {
  it("grows exponentially up to maxMs, full jitter scaled by random()", () => {
    let r = 0.999;
    const t = setup({ random: () => r, backoff: { initialMs: 100, maxMs: 1000 } });
    t.client.connect();
    const delays: number[] = [];
    for (let i = 0; i < 7; i++) {
      t.last().serverClose(1006);
      const d = t.of("reconnecting").at(-1)!;
      assert.equal(d.attempt, i);
      delays.push(d.delay);
      t.clock.advance(d.delay);
    }
    // caps 100, 200, 400, 800, 1000, 1000, 1000; delay = floor(0.999 * cap)
    assert.deepEqual(delays, [99, 199, 399, 799, 999, 999, 999]);
    assert.equal(t.sockets.length, 8);

    r = 0;
    t.last().serverClose(1006);
    assert.equal(t.of("reconnecting").at(-1)!.delay, 0);
  });

  it("every delay lies in [0, min(max, initial * 2^attempt))", () => {
    let seed = 42;
    const random = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    const t = setup({ random });
    t.client.connect();
    for (let i = 0; i < 20; i++) {
      t.last().serverClose(1006);
      const { delay, attempt } = t.of("reconnecting").at(-1)!;
      const cap = Math.min(30_000, 500 * 2 ** attempt);
      assert.ok(delay >= 0 && delay < cap, `attempt ${attempt}: ${delay} not in [0, ${cap})`);
      t.clock.advance(delay);
    }
  });

  it("defaults to 500 ms initial and resets after connection.established", () => {
    const t = setup({ random: () => 0.999999 });
    t.client.connect();
    t.last().serverClose(1006);
    t.clock.advance(t.of("reconnecting").at(-1)!.delay);
    t.last().serverClose(1006);
    t.clock.advance(t.of("reconnecting").at(-1)!.delay);
    t.last().serverClose(1006);
    assert.deepEqual(
      t.of("reconnecting").map((r) => r.delay),
      [499, 999, 1999],
    );
    t.clock.advance(2000);
    t.establish();
    assert.equal(t.client.state, "connected");
    t.last().serverClose(1006);
    assert.equal(t.of("reconnecting").at(-1)!.delay, 499);
    assert.equal(t.of("reconnecting").at(-1)!.attempt, 0);
  });

  it("does not reconnect before the delay elapsed", () => {
    const t = setup({ random: () => 0.5 });
    t.client.connect();
    t.last().serverClose(1006);
    assert.equal(t.of("reconnecting")[0]!.delay, 250);
    t.clock.advance(249);
    assert.equal(t.sockets.length, 1);
    t.clock.advance(1);
    assert.equal(t.sockets.length, 2);
  });
});

describe("resume", () => {
  it("first URL carries the token only; reconnect URL carries last_seq and epoch", () => {
    const t = setup();
    t.client.connect();
    const first = t.last();
    assert.equal(first.query("token"), "t0");
    assert.equal(first.query("last_seq"), null);
    assert.equal(first.query("epoch"), null);
    t.establish({ seq: 5, epoch: "ep-A" });
    first.receive(event(6));
    first.receive(event(7));
    assert.deepEqual(t.client.position(), { seq: 7, epoch: "ep-A" });
    first.serverClose(1006);
    t.clock.advance(1000);
    const second = t.last();
    assert.notEqual(second, first);
    assert.equal(second.query("last_seq"), "7");
    assert.equal(second.query("epoch"), "ep-A");
    assert.equal(second.query("token"), "t0");
    assert.equal(new URL(second.url).pathname, `/ws/${PROJECT}`);
  });

  it("fresh connection adopts established.seq", () => {
    const t = setup();
    t.client.connect();
    t.establish({ seq: 41, epoch: "e9" });
    t.last().serverClose(1001);
    t.clock.advance(1000);
    assert.equal(t.last().query("last_seq"), "41");
    assert.equal(t.last().query("epoch"), "e9");
  });

  it("does not add ?token= when the URL already carries credentials", () => {
    for (const q of ["token=abc", "session=s1"]) {
      const t = setup({ url: `ws://gw.test/ws/${PROJECT}?${q}`, token: "other" });
      t.client.connect();
      assert.equal(t.last().url.includes("other"), false, q);
      assert.ok(t.last().url.includes(q), q);
    }
  });

  it("drops a replayed event whose seq is <= the last seen", () => {
    const t = setup();
    const seen: number[] = [];
    t.client.on("node.state.updated", (m) => seen.push(m.seq ?? -1));
    const any: string[] = [];
    t.client.onAny((m) => any.push(m.type));
    t.client.connect();
    t.establish({ seq: 2 });
    t.last().receive(event(3));
    t.last().receive(event(4));
    t.last().receive(event(4)); // duplicate on the same connection
    t.last().serverClose(4500);
    t.clock.advance(1000);
    assert.equal(t.last().query("last_seq"), "4");
    t.establish({ seq: 6, resumed: true });
    t.last().receive(event(3)); // overlap
    t.last().receive(event(4)); // overlap
    t.last().receive(event(5));
    t.last().receive(event(6));
    t.last().receive(event(undefined)); // raw Redis events carry no seq: always delivered
    assert.deepEqual(seen, [3, 4, 5, 6, -1]);
    assert.equal(any.filter((x) => x === "node.state.updated").length, 5);
    assert.equal(t.client.position().seq, 6);
  });

  it("resync_required: emits resync, adopts the new epoch and the status seq", () => {
    const t = setup();
    const seen: number[] = [];
    t.client.on("node.state.updated", (m) => seen.push(m.seq ?? -1));
    const statuses: ServerMessage[] = [];
    t.client.on("status", (m) => statuses.push(m));
    t.client.connect();
    t.establish({ seq: 10, epoch: "old" });
    t.last().receive(event(11));
    t.last().serverClose(1006);
    t.clock.advance(1000);
    assert.equal(t.last().query("last_seq"), "11");
    assert.equal(t.last().query("epoch"), "old");

    t.establish({ seq: 3, epoch: "new", resumed: false });
    t.last().receive({
      type: "connection.resync_required",
      from_seq: 11,
      earliest_seq: 1,
      epoch: "new",
      project_id: PROJECT,
      timestamp: "t",
    });
    assert.equal(t.of("resync").length, 1);
    assert.equal(t.of("resync")[0]!.from_seq, 11);
    assert.equal(t.of("resync")[0]!.epoch, "new");
    t.last().receive({ type: "status", seq: 3, nodes: {}, tasks: {}, project_id: PROJECT, timestamp: "t" });
    assert.equal(statuses.length, 1);
    assert.deepEqual(t.client.position(), { seq: 3, epoch: "new" });
    t.last().receive(event(3)); // covered by the snapshot
    t.last().receive(event(4)); // lower than the old 11 but new in the new epoch
    assert.deepEqual(seen, [11, 4]);
    assert.deepEqual(t.client.position(), { seq: 4, epoch: "new" });

    t.last().serverClose(1006);
    t.clock.advance(1000);
    assert.equal(t.last().query("last_seq"), "4");
    assert.equal(t.last().query("epoch"), "new");
  });

  it("/ws/user: no last_seq in the URL, dedup per event project_id", () => {
    const t = setup({ url: "ws://gw.test/ws/user" });
    const seen: string[] = [];
    t.client.on("node.state.updated", (m) => seen.push(`${m.project_id}:${m.seq}`));
    t.client.connect();
    const ws = t.last();
    ws.open();
    ws.receive({
      ...established(),
      project_id: undefined,
      seq: undefined,
      epoch: undefined,
      projects: ["a", "b", "c"],
      positions: { a: { seq: 0, epoch: "ea" }, b: { seq: 0, epoch: "eb" }, c: { seq: 7, epoch: "ec" } },
    });
    assert.deepEqual(t.client.position("c"), { seq: 7, epoch: "ec" });
    ws.receive(event(7, { project_id: "c" })); // covered by the announced position
    ws.receive(event(1, { project_id: "a" }));
    ws.receive(event(1, { project_id: "b" }));
    ws.receive(event(1, { project_id: "a" }));
    ws.receive(event(2, { project_id: "b" }));
    assert.deepEqual(seen, ["a:1", "b:1", "b:2"]);
    ws.serverClose(1006);
    t.clock.advance(1000);
    assert.equal(t.last().query("last_seq"), null);
    assert.equal(new URL(t.last().url).pathname, "/ws/user");
  });
});

describe("close codes", () => {
  const stops: [number, string][] = [
    [4001, "unauthenticated"],
    [4003, "forbidden"],
    [4029, "rate_limited"],
    [1003, "protocol_error"],
    [1008, "protocol_error"],
    [1009, "protocol_error"],
  ];
  for (const [code, reason] of stops) {
    it(`${code} stops with '${reason}' and never reconnects`, () => {
      const t = setup();
      t.client.connect();
      t.establish();
      t.last().serverClose(code);
      assert.deepEqual(t.of("stopped"), [{ reason, code }]);
      assert.equal(t.of("reconnecting").length, 0);
      assert.equal(t.client.state, "stopped");
      t.clock.advance(10 * 60_000);
      assert.equal(t.sockets.length, 1);
    });
  }

  for (const code of [1000, 1001, 1006, 1011, 1012, 4500, 4999]) {
    it(`${code} from the server reconnects with backoff`, () => {
      const t = setup();
      t.client.connect();
      t.establish();
      t.last().serverClose(code);
      assert.equal(t.of("stopped").length, 0);
      assert.equal(t.of("reconnecting").length, 1);
      assert.equal(t.of("reconnecting")[0]!.code, code);
      assert.equal(t.of("close")[0]!.code, code);
      t.clock.advance(500);
      assert.equal(t.sockets.length, 2);
    });
  }

  it("1013 (credential store unreachable) retries with growing backoff and never stops", () => {
    const t = setup({ random: () => 0.999999 });
    t.client.connect();
    const delays: number[] = [];
    for (let i = 0; i < 5; i++) {
      // What the gateway sends after the upgrade: connection.closed, then close 1013.
      t.last().receive({ type: "connection.closed", code: 1013, reason: "auth_unavailable", timestamp: "t" });
      t.last().serverClose(1013);
      const r = t.of("reconnecting").at(-1)!;
      assert.equal(r.code, 1013);
      delays.push(r.delay);
      t.clock.advance(r.delay);
    }
    assert.deepEqual(delays, [499, 999, 1999, 3999, 7999]);
    assert.equal(t.of("stopped").length, 0);
    assert.equal(t.sockets.length, 6);
    // A 1013 lost in transit (1006) still counts as 1013 thanks to the connection.closed frame.
    t.last().receive({ type: "connection.closed", code: 1013, reason: "auth_unavailable", timestamp: "t" });
    t.last().serverClose(1006);
    assert.equal(t.of("reconnecting").at(-1)!.code, 1013);
    assert.equal(t.of("stopped").length, 0);
    assert.deepEqual(closeAction(1013, true), { kind: "reconnect", freshToken: true });
    assert.deepEqual(closeAction(1013, false), { kind: "reconnect", freshToken: false });
  });

  it("an error event alone (no close follows) counts as an abnormal close", () => {
    const t = setup();
    t.client.connect();
    const ws = t.last();
    ws.fail(); // e.g. connection refused
    assert.equal(t.of("close")[0]!.code, 1006);
    assert.equal(t.of("reconnecting").length, 1);
    ws.serverClose(1006); // a late close from the same socket is ignored
    assert.equal(t.of("close").length, 1);
    t.clock.advance(1000);
    assert.equal(t.sockets.length, 2);
  });

  it("an error after a connection.closed frame uses the frame's code", () => {
    const t = setup();
    t.client.connect();
    t.establish();
    t.last().receive({ type: "connection.closed", code: 4003, reason: "forbidden", timestamp: "t" });
    t.last().fail();
    assert.deepEqual(t.of("stopped"), [{ reason: "forbidden", code: 4003 }]);
  });

  it("a connection.closed frame supplies the code when the transport lost it", () => {
    const t = setup();
    t.client.connect();
    t.establish();
    t.last().receive({ type: "connection.closed", code: 4001, reason: "token expired", timestamp: "t" });
    t.last().serverClose(1006);
    assert.deepEqual(t.of("stopped"), [{ reason: "unauthenticated", code: 4001 }]);
  });

  it("close() closes with 1000 and stops; no reconnect", () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish();
    t.client.close();
    assert.deepEqual(ws.closedByClient, { code: 1000, reason: "client closed" });
    assert.deepEqual(t.of("stopped"), [{ reason: "closed", code: 1000 }]);
    assert.equal(t.client.state, "stopped");
    ws.serverClose(1000); // late close event from the transport is ignored
    t.clock.advance(60_000);
    assert.equal(t.sockets.length, 1);
    assert.equal(t.of("reconnecting").length, 0);
  });

  it("close() during a pending reconnect cancels it; connect() starts again", () => {
    const t = setup();
    t.client.connect();
    t.last().serverClose(1006);
    t.client.close();
    t.clock.advance(60_000);
    assert.equal(t.sockets.length, 1);
    t.client.connect();
    assert.equal(t.sockets.length, 2);
  });

  it("4004 without getToken stops with 'credential_expired'", () => {
    const t = setup();
    t.client.connect();
    t.establish();
    t.last().serverClose(4004);
    assert.deepEqual(t.of("stopped"), [{ reason: "credential_expired", code: 4004 }]);
  });

  it("4004 with getToken fetches a fresh token, then reconnects with it", async () => {
    let calls = 0;
    const t = setup({ getToken: async () => `fresh-${++calls}` });
    t.client.connect();
    assert.equal(calls, 0, "an explicit token is used for the first connect");
    assert.equal(t.last().query("token"), "t0");
    t.establish({ seq: 3 });
    t.last().serverClose(4004);
    assert.equal(t.of("stopped").length, 0);
    t.clock.advance(t.of("reconnecting")[0]!.delay);
    await flush();
    assert.equal(calls, 1);
    assert.equal(t.sockets.length, 2);
    assert.equal(t.last().query("token"), "fresh-1");
    assert.equal(t.last().query("last_seq"), "3");
  });

  it("getToken is used for the first connect when no token is given; a failure retries", async () => {
    let fail = true;
    const t = setup({
      token: undefined,
      getToken: async () => {
        if (fail) throw new Error("auth server down");
        return "tk";
      },
    });
    t.client.connect();
    await flush();
    assert.equal(t.sockets.length, 0);
    assert.equal(t.of("clientError").length, 1);
    assert.equal(t.of("reconnecting").length, 1);
    fail = false;
    t.clock.advance(1000);
    await flush();
    assert.equal(t.sockets.length, 1);
    assert.equal(t.last().query("token"), "tk");
  });

  it("container.reconnect's reconnect_after_ms sets the next delay (then 1012)", () => {
    const t = setup({ random: () => 0.999 });
    t.client.connect();
    t.establish({ seq: 9 });
    t.last().receive({ type: "container.reconnect", message: "restarting", reconnect_after_ms: 1234, timestamp: "t" });
    t.last().serverClose(1012);
    assert.equal(t.of("reconnecting")[0]!.delay, 1234);
    t.clock.advance(1233);
    assert.equal(t.sockets.length, 1);
    t.clock.advance(1);
    assert.equal(t.sockets.length, 2);
    assert.equal(t.last().query("last_seq"), "9");
    // only for that one attempt
    t.last().serverClose(1006);
    assert.equal(t.of("reconnecting")[1]!.delay, Math.floor(0.999 * 1000));
  });

  it("1012 without container.reconnect uses the backoff", () => {
    const t = setup({ random: () => 0.5 });
    t.client.connect();
    t.establish();
    t.last().serverClose(1012);
    assert.equal(t.of("reconnecting")[0]!.delay, 250);
  });

  it("closeAction table", () => {
    assert.deepEqual(closeAction(4004, false), { kind: "stop", reason: "credential_expired" });
    assert.deepEqual(closeAction(4004, true), { kind: "reconnect", freshToken: true });
    assert.deepEqual(closeAction(1006, false), { kind: "reconnect", freshToken: false });
  });
});

describe("commands", () => {
  it("execute resolves on command.accepted with its request_id", async () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish();
    const p = t.client.execute("node-7", { steps: 20 });
    const sent = ws.lastSent();
    assert.equal(sent["type"], "node.execute");
    assert.equal(sent["node_id"], "node-7");
    assert.deepEqual(sent["parameters"], { steps: 20 });
    assert.equal(typeof sent["request_id"], "string");
    ws.receive({ type: "command.accepted", command: "node.execute", request_id: "someone-else", delivered_to: 9, timestamp: "t" });
    ws.receive({ type: "command.accepted", command: "node.execute", request_id: sent["request_id"], delivered_to: 2, timestamp: "t" });
    const ok = await p;
    assert.equal(ok.delivered_to, 2);
    assert.equal(ok.request_id, sent["request_id"]);
  });

  it("execute defaults parameters to {} and passes projectId", async () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish();
    const p = t.client.execute("n", undefined, { projectId: "other" });
    const sent = ws.lastSent();
    assert.deepEqual(sent["parameters"], {});
    assert.equal(sent["project_id"], "other");
    ws.receive({ type: "command.accepted", command: "node.execute", request_id: sent["request_id"], delivered_to: 0, timestamp: "t" });
    await p;
  });

  it("rejects with a SwitchboardError on an error frame with its request_id", async () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish();
    const p = t.client.cancelTask("task-1");
    const sent = ws.lastSent();
    assert.equal(sent["type"], "task.cancel");
    assert.equal(sent["task_id"], "task-1");
    ws.receive({ type: "error", code: "broker_unavailable", message: "retry later", request_id: sent["request_id"], timestamp: "t" });
    await assert.rejects(p, (err: unknown) => {
      assert.ok(err instanceof SwitchboardError);
      assert.equal(err.code, "broker_unavailable");
      assert.equal(err.requestId, sent["request_id"]);
      assert.equal(err.message, "retry later");
      return true;
    });
  });

  it("an error without request_id answers the oldest unanswered request", async () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish();
    const a = t.client.execute("n1", {}, { projectId: "not-mine" });
    const b = t.client.execute("n2");
    const bId = ws.lastSent()["request_id"];
    ws.receive({ type: "error", code: "forbidden", message: "no", field: "project_id", timestamp: "t" });
    ws.receive({ type: "command.accepted", command: "node.execute", request_id: bId, delivered_to: 1, timestamp: "t" });
    await assert.rejects(a, (err: unknown) => err instanceof SwitchboardError && err.code === "forbidden" && err.field === "project_id");
    assert.equal((await b).request_id, bId);
  });

  it("rejects with 'timeout' after commandTimeoutMs; a late answer is not misattributed", async () => {
    const t = setup({ commandTimeoutMs: 2000 });
    t.client.connect();
    const ws = t.establish();
    const p = t.client.execute("n1");
    t.clock.advance(1999);
    let settled = false;
    p.catch(() => {}).finally(() => (settled = true));
    await flush();
    assert.equal(settled, false);
    t.clock.advance(1);
    await assert.rejects(p, (err: unknown) => err instanceof SwitchboardError && err.code === "timeout");
    // the late error answer to the timed-out request must not reject the next one
    const q = t.client.execute("n2");
    const qId = ws.lastSent()["request_id"];
    ws.receive({ type: "error", code: "invalid_message", message: "late", timestamp: "t" });
    ws.receive({ type: "command.accepted", command: "node.execute", request_id: qId, delivered_to: 1, timestamp: "t" });
    assert.equal((await q).request_id, qId);
  });

  it("rejects with 'disconnected' when the connection drops first", async () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish();
    const p = t.client.execute("n1");
    ws.serverClose(1006);
    await assert.rejects(p, (err: unknown) => err instanceof SwitchboardError && err.code === "disconnected" && err.closeCode === 1006);
  });

  it("rejects with 'closed' on close() and 'not_connected' before established", async () => {
    const t = setup();
    t.client.connect();
    await assert.rejects(t.client.execute("n"), (err: unknown) => err instanceof SwitchboardError && err.code === "not_connected");
    t.establish();
    const p = t.client.execute("n");
    t.client.close();
    await assert.rejects(p, (err: unknown) => err instanceof SwitchboardError && err.code === "closed");
  });

  it("subscribe / unsubscribe resolve; forbidden rejects; subscriptions are renewed after reconnect", async () => {
    const t = setup();
    t.client.connect();
    let ws = t.establish();
    const s = t.client.subscribe("p2");
    assert.deepEqual(ws.lastSent(), { type: "subscribe", project_id: "p2" });
    ws.receive({ type: "subscribed", project_id: "p2", seq: 40, epoch: "x", timestamp: "t" });
    assert.equal((await s).project_id, "p2");

    const f = t.client.subscribe("secret");
    ws.receive({ type: "error", code: "forbidden", message: "no", field: "project_id", timestamp: "t" });
    await assert.rejects(f, (err: unknown) => err instanceof SwitchboardError && err.code === "forbidden");

    // events of p2 are deduplicated on their own seq line
    const seen: string[] = [];
    t.client.on("task.queued", (m) => seen.push(`${m.project_id}:${m.seq}`));
    ws.receive(event(38, { type: "task.queued", project_id: "p2" })); // raced the reply: kept
    ws.receive(event(38, { type: "task.queued", project_id: "p2" }));
    assert.deepEqual(seen, ["p2:38"]);

    ws.serverClose(1006);
    t.clock.advance(1000);
    ws = t.establish();
    assert.deepEqual(ws.sentJson(), [{ type: "subscribe", project_id: "p2" }]);
    ws.receive({ type: "subscribed", project_id: "p2", timestamp: "t" });

    const u = t.client.unsubscribe("p2");
    ws.receive({ type: "unsubscribed", project_id: "p2", timestamp: "t" });
    assert.equal((await u).project_id, "p2");
    ws.serverClose(1006);
    t.clock.advance(1000);
    ws = t.establish();
    assert.deepEqual(ws.sentJson(), []);
  });

  it("refreshAuth sends auth.refresh, resolves on auth.refreshed, and later reconnects use the token", async () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish();
    const p = t.client.refreshAuth("t1");
    assert.deepEqual(ws.lastSent(), { type: "auth.refresh", token: "t1" });
    ws.receive({ type: "auth.refreshed", expires_at: 1_900_000_000, timestamp: "t" });
    assert.equal((await p).expires_at, 1_900_000_000);
    ws.serverClose(1006);
    t.clock.advance(1000);
    assert.equal(t.last().query("token"), "t1");
  });

  it("requestStatus and ping", async () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish();
    // answered by the first status frame that arrives while the request heads the queue
    const st = t.client.requestStatus();
    assert.deepEqual(ws.lastSent(), { type: "status" });
    ws.receive({ type: "status", seq: 0, nodes: { n1: { state: "idle", updated_at: "t" } }, tasks: {}, timestamp: "t" });
    assert.ok("n1" in (await st).nodes);
    const pg = t.client.ping();
    assert.deepEqual(ws.lastSent(), { type: "ping" });
    ws.receive({ type: "pong", timestamp: "t" });
    assert.equal(typeof (await pg), "number");
  });
});

describe("liveness", () => {
  it("closes and reconnects after 2.5 x heartbeat_interval of silence", () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish({ heartbeat_interval: 2 });
    t.clock.advance(4000);
    ws.receive({ type: "system.heartbeat", timestamp: "t" }); // resets the timer
    t.clock.advance(4999);
    assert.equal(ws.closedByClient, undefined);
    assert.equal(t.of("reconnecting").length, 0);
    t.clock.advance(1);
    assert.deepEqual(ws.closedByClient, { code: 4000, reason: "liveness timeout" });
    assert.equal(t.of("close").at(-1)!.code, 4000);
    assert.equal(t.of("reconnecting").length, 1);
    t.clock.advance(1000);
    assert.equal(t.sockets.length, 2);
  });

  it("a text pong also counts as traffic", () => {
    const t = setup();
    t.client.connect();
    const ws = t.establish({ heartbeat_interval: 1 });
    t.clock.advance(2000);
    ws.receive("pong");
    t.clock.advance(2000);
    assert.equal(ws.closedByClient, undefined);
    t.clock.advance(500);
    assert.ok(ws.closedByClient);
  });

  it("works with real timers", async () => {
    const sockets: FakeWebSocket[] = [];
    class WS extends FakeWebSocket {
      constructor(url: string) {
        super(url);
        sockets.push(this);
      }
    }
    const client = new SwitchboardClient({ url: "ws://gw.test/ws/p", WebSocket: WS, random: () => 0, backoff: { initialMs: 1 } });
    const reconnects: number[] = [];
    client.on("reconnecting", (r) => reconnects.push(r.delay));
    client.connect();
    sockets[0]!.open();
    sockets[0]!.receive(established({ project_id: "p", heartbeat_interval: 0.02 })); // 50 ms window
    await new Promise((r) => setTimeout(r, 120));
    assert.ok(sockets[0]!.closedByClient, "liveness close");
    assert.deepEqual(reconnects.slice(0, 1), [0]);
    assert.ok(sockets.length >= 2);
    client.close();
  });
});

describe("robustness", () => {
  it("bad frames never throw out of dispatch", () => {
    const t = setup();
    const got: string[] = [];
    t.client.onAny((m) => got.push(m.type));
    t.client.connect();
    const ws = t.establish();
    assert.doesNotThrow(() => {
      ws.receive("pong");
      ws.receive("not json {");
      ws.receive("[1,2,3]");
      ws.receive("42");
      ws.receive("null");
      ws.receive('{"no_type": true}');
      ws.receive('{"type": 5}');
      ws.onmessage?.({ data: undefined });
      ws.onmessage?.({ data: { weird: true } });
      ws.receive({ type: "command.accepted" }); // missing fields, nothing pending
      ws.receive({ type: "error" });
      ws.receive({ type: "connection.resync_required" });
      ws.receive({ type: "status", project_id: 7 });
    });
    ws.receive(new TextEncoder().encode(JSON.stringify(event(1))));
    assert.deepEqual(got, ["connection.established", "command.accepted", "error", "connection.resync_required", "status", "node.state.updated"]);
    assert.equal(t.client.state, "connected");
  });

  it("a throwing listener is reported as clientError and does not stop the others", () => {
    const t = setup();
    const got: number[] = [];
    t.client.on("node.state.updated", () => {
      throw new Error("app bug");
    });
    t.client.on("node.state.updated", (m) => got.push(m.seq!));
    t.client.connect();
    t.establish();
    t.last().receive(event(1));
    t.last().receive(event(2));
    assert.deepEqual(got, [1, 2]);
    assert.equal(t.of("clientError").length, 2);
  });

  it("the unsubscribe function returned by on() works", () => {
    const t = setup();
    let n = 0;
    const off = t.client.on("task.started", () => n++);
    t.client.connect();
    t.establish();
    t.last().receive(event(1, { type: "task.started" }));
    off();
    t.last().receive(event(2, { type: "task.started" }));
    assert.equal(n, 1);
  });

  it("a listener calling close() during 'close' prevents the reconnect", () => {
    const t = setup();
    t.client.on("close", () => t.client.close());
    t.client.connect();
    t.establish();
    t.last().serverClose(1006);
    assert.equal(t.of("reconnecting").length, 0);
    assert.equal(t.client.state, "stopped");
    t.clock.advance(60_000);
    assert.equal(t.sockets.length, 1);
  });

  it("http(s) URLs are mapped to ws(s)", () => {
    const t = setup({ url: "https://gw.test/ws/abc" });
    t.client.connect();
    assert.ok(t.last().url.startsWith("wss://gw.test/ws/abc?"));
  });
});
