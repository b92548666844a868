// The program of the client's browser test page (browser/client.test.mjs). It runs in
// Chromium, imports the client bundle (console/switchboard-client.js, the file the gateway
// embeds and serves; harness.mjs rewrites the import below), and records what every client
// it opens sees, for the test to read through `window.sbTest`. Typechecked with tsconfig.console.json, so the
// listeners below are checked against the generated event types.

import {
  SwitchboardClient,
  SwitchboardError,
  type LifecycleEvents,
  type NodeState,
} from "../src/index.js";

/** What one typed listener saw: the fields the test asserts on. */
type Typed =
  | { type: "node.state.updated"; seq: number | undefined; node_id: string; state: NodeState }
  | { type: "task.progress"; seq: number | undefined; task_id: string; percentage: number; step: string }
  | { type: "file.changed"; seq: number | undefined; file_path: string | null | undefined };

interface Record_ {
  client: SwitchboardClient;
  /** Every delivered frame: type and seq. */
  frames: { type: string; seq: number | undefined; resumed?: boolean }[];
  typed: Typed[];
  lifecycle: { name: keyof LifecycleEvents; payload: unknown }[];
}

const clients = new Map<string, Record_>();

function get(name: string): Record_ {
  const r = clients.get(name);
  if (!r) throw new Error(`no client ${name}`);
  return r;
}

const api = {
  /** Opens a client named `name` on `{gateway}/ws/{project}` (`gateway`: http://host:port). */
  open(name: string, gateway: string, project: string, token: string): void {
    const client = new SwitchboardClient({
      url: `${gateway}/ws/${encodeURIComponent(project)}`,
      token,
      // Short delays: the restart test waits for a reconnect, not for a 30 s backoff cap.
      backoff: { initialMs: 200, maxMs: 1000 },
    });
    const rec: Record_ = { client, frames: [], typed: [], lifecycle: [] };
    clients.set(name, rec);
    client.onAny((msg) => {
      const frame: Record_["frames"][number] = { type: msg.type, seq: msg.seq ?? undefined };
      if (msg.type === "connection.established") frame.resumed = msg.resumed;
      rec.frames.push(frame);
    });
    client.on("node.state.updated", (e) => {
      rec.typed.push({ type: e.type, seq: e.seq, node_id: e.node_id, state: e.state });
    });
    client.on("task.progress", (e) => {
      rec.typed.push({
        type: e.type,
        seq: e.seq,
        task_id: e.task_id,
        percentage: e.progress.percentage,
        step: e.progress.step_description,
      });
    });
    client.on("file.changed", (e) => {
      rec.typed.push({ type: e.type, seq: e.seq, file_path: e.file_path });
    });
    for (const name of ["open", "close", "reconnecting", "resync", "stopped", "clientError"] as const) {
      client.on(name, (payload: unknown) => {
        rec.lifecycle.push({ name, payload: payload instanceof Error ? payload.message : payload });
      });
    }
    client.connect();
  },

  state(name: string): string {
    return get(name).client.state;
  },

  frames(name: string): Record_["frames"] {
    return get(name).frames;
  },

  typed(name: string): Typed[] {
    return get(name).typed;
  },

  lifecycle(name: string): Record_["lifecycle"] {
    return get(name).lifecycle;
  },

  /** `node.execute`: the `command.accepted` reply, or the error's code and message. */
  async execute(name: string, nodeId: string, parameters: Record<string, unknown>): Promise<unknown> {
    try {
      return await get(name).client.execute(nodeId, parameters, { requestId: `req-${nodeId}` });
    } catch (err) {
      if (err instanceof SwitchboardError) return { error: err.code, message: err.message };
      throw err;
    }
  },

  close(name: string): void {
    get(name).client.close();
  },
};

declare global {
  interface Window {
    sbTest: typeof api;
  }
}

window.sbTest = api;
document.body.dataset["ready"] = "true";
