import { describe, it } from "node:test";
import assert from "node:assert/strict";

import { StoryProgressSocket, isStoryProgress, type StoryProgress } from "../src/index.js";
import { FakeClock, FakeWebSocket } from "./helpers.js";

function setup(storyId: string | null = "st-1") {
  const sockets: FakeWebSocket[] = [];
  const clock = new FakeClock();
  const got: StoryProgress[] = [];
  const stops: { code: number; reason: string }[] = [];
  const s = new StoryProgressSocket({
    url: "ws://gw.example/",
    storyId,
    token: "a.b c",
    onProgress: (p) => got.push(p),
    onStop: (r) => stops.push(r),
    WebSocket: class extends FakeWebSocket {
      constructor(url: string) {
        super(url);
        sockets.push(this);
      }
    },
    timers: clock,
    random: () => 0.5,
    backoff: { initialMs: 100, maxMs: 1000 },
  });
  return { s, sockets, clock, got, stops, last: () => sockets[sockets.length - 1]! };
}

describe("story progress socket", () => {
  it("connects where the seed's frontend does and passes progress through", () => {
    const t = setup();
    t.s.connect();
    assert.equal(t.last().url, "ws://gw.example/ws/stories/st-1/progress?token=a.b%20c");
    t.last().open();
    const p = { story_id: "st-1", status: "generating", progress_percent: 40, current_step: "Writing" };
    t.last().receive(p);
    t.last().receive("ping"); // the gateway's keepalive: no progress, no answer needed
    t.last().receive({ type: "system.heartbeat" }); // not progress
    t.last().receive({ status: "done", progress_percent: 5 });
    assert.deepEqual(t.got, [p]);
    assert.ok(t.s.requestStatus() && t.s.ping());
    assert.deepEqual(t.last().sent, ["status", "ping"]);
    assert.equal(setup(null).s.socketUrl, "ws://gw.example/ws/user/stories?token=a.b%20c");
  });

  it("reconnects with backoff, but stops on 4001 and 4003", () => {
    const t = setup();
    t.s.connect();
    t.last().open();
    t.last().serverClose(1006);
    assert.equal(t.sockets.length, 1);
    t.clock.advance(50); // 0.5 * 100
    assert.equal(t.sockets.length, 2, "reconnected");
    t.last().serverClose(1012);
    t.clock.advance(100); // 0.5 * 200
    assert.equal(t.sockets.length, 3);
    t.last().serverClose(4003, "Access denied");
    t.clock.advance(10_000);
    assert.equal(t.sockets.length, 3, "no reconnect after Access denied");
    assert.deepEqual(t.stops, [{ code: 4003, reason: "Access denied" }]);
  });

  it("checks what counts as progress", () => {
    assert.ok(isStoryProgress({ status: "complete", progress_percent: 100 }));
    for (const bad of [null, [], "x", { status: "complete" }, { status: "x", progress_percent: 1 }, { status: "failed", progress_percent: 101 }]) {
      assert.ok(!isStoryProgress(bad), JSON.stringify(bad));
    }
  });
});
