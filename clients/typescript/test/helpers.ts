// Test doubles: an in-memory WebSocket the test drives, and a manual clock.

import { SwitchboardClient, type SwitchboardClientOptions, type Timers, type LifecycleEvents } from "../src/index.js";

export class FakeWebSocket {
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string; wasClean: boolean }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  binaryType = "blob";

  readonly url: string;
  readonly sent: string[] = [];
  /** Set when the client called close(). */
  closedByClient: { code?: number; reason?: string } | undefined;
  isOpen = false;

  constructor(url: string) {
    this.url = url;
  }

  // --- called by the client ---
  send(data: string): void {
    if (!this.isOpen) throw new Error("not open");
    this.sent.push(data);
  }
  close(code?: number, reason?: string): void {
    this.closedByClient = { code, reason };
    this.isOpen = false;
  }

  // --- driven by the test (the "server") ---
  open(): void {
    this.isOpen = true;
    this.onopen?.({});
  }
  receive(frame: unknown): void {
    const data = typeof frame === "string" || frame instanceof Uint8Array ? frame : JSON.stringify(frame);
    this.onmessage?.({ data });
  }
  serverClose(code: number, reason = ""): void {
    this.isOpen = false;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
  /** Transport failure (refused connection, reset). */
  fail(): void {
    this.isOpen = false;
    this.onerror?.({ type: "error" });
  }
  /** Parsed JSON messages the client sent. */
  sentJson(): Record<string, unknown>[] {
    return this.sent.map((s) => JSON.parse(s) as Record<string, unknown>);
  }
  lastSent(): Record<string, unknown> {
    const all = this.sentJson();
    const last = all[all.length - 1];
    if (!last) throw new Error("nothing sent");
    return last;
  }
  query(name: string): string | null {
    return new URL(this.url).searchParams.get(name);
  }
}

/** Deterministic timers: nothing fires until advance(). */
export class FakeClock implements Timers {
  now = 0;
  private nextId = 1;
  private readonly tasks = new Map<number, { at: number; fn: () => void }>();

  setTimeout(fn: () => void, ms: number): unknown {
    const id = this.nextId++;
    this.tasks.set(id, { at: this.now + Math.max(0, ms), fn });
    return id;
  }
  clearTimeout(handle: unknown): void {
    this.tasks.delete(handle as number);
  }
  advance(ms: number): void {
    const end = this.now + ms;
    for (;;) {
      let next: [number, { at: number; fn: () => void }] | undefined;
      for (const entry of this.tasks) {
        if (entry[1].at <= end && (!next || entry[1].at < next[1].at)) next = entry;
      }
      if (!next) break;
      this.tasks.delete(next[0]);
      this.now = next[1].at;
      next[1].fn();
    }
    this.now = end;
  }
  get pending(): number {
    return this.tasks.size;
  }
}

export const PROJECT = "proj1";

export function established(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    type: "connection.established",
    client_id: "c-1",
    project_id: PROJECT,
    user_id: "u-1",
    instance_id: "i-1",
    seq: 0,
    epoch: "e1",
    heartbeat_interval: 30,
    resumed: false,
    timestamp: "2024-01-01T00:00:00.000Z",
    ...over,
  };
}

export function event(seq: number | undefined, over: Record<string, unknown> = {}): Record<string, unknown> {
  const e: Record<string, unknown> = {
    type: "node.state.updated",
    node_id: "n1",
    state: "processing",
    project_id: PROJECT,
    timestamp: "2024-01-01T00:00:00.000Z",
    ...over,
  };
  if (seq !== undefined) e["seq"] = seq;
  return e;
}

export type Recorded = { [K in keyof LifecycleEvents]: { event: K; payload: LifecycleEvents[K] } }[keyof LifecycleEvents];

export function setup(opts: Partial<SwitchboardClientOptions> = {}) {
  const clock = new FakeClock();
  const sockets: FakeWebSocket[] = [];
  class WS extends FakeWebSocket {
    constructor(url: string) {
      super(url);
      sockets.push(this);
    }
  }
  const client = new SwitchboardClient({
    url: `ws://gw.test/ws/${PROJECT}`,
    token: "t0",
    WebSocket: WS,
    timers: clock,
    random: () => 0.5,
    ...opts,
  });
  const log: Recorded[] = [];
  for (const name of ["open", "close", "reconnecting", "resync", "stopped", "clientError"] as const) {
    client.on(name, (payload: unknown) => log.push({ event: name, payload } as Recorded));
  }
  const last = (): FakeWebSocket => {
    const s = sockets[sockets.length - 1];
    if (!s) throw new Error("no socket yet");
    return s;
  };
  /** Connects and completes the handshake of the newest socket. */
  const establish = (over: Record<string, unknown> = {}): FakeWebSocket => {
    const ws = last();
    ws.open();
    ws.receive(established(over));
    return ws;
  };
  const of = <K extends keyof LifecycleEvents>(name: K): LifecycleEvents[K][] =>
    log.filter((r) => r.event === name).map((r) => r.payload as LifecycleEvents[K]);
  return { client, clock, sockets, last, establish, log, of };
}

/** Lets pending promise callbacks (getToken, request rejections) run. */
export function flush(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
