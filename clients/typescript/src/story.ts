// Story progress sockets (docs/protocol.md §9, Code Story / seed 003): one WebSocket to
// `/ws/stories/{id}/progress` (or `/ws/user/stories`), typed progress, auto-reconnect.
//
// The gateway sends the workers' progress objects unchanged: no envelope, no
// `connection.established`, no seq (a reconnect starts again from the story's current
// progress, which the gateway sends first). It also sends the seed's text `ping` as a
// keepalive, which needs no answer. 4001 (`Invalid token`) and 4003 (`Access denied`) stop
// the socket: reconnecting cannot fix them; any other close reconnects with backoff.

import type { Timers, WebSocketConstructor, WebSocketLike } from "./client.js";

/** The statuses a story goes through. */
export type StoryStatus = "analyzing" | "generating" | "synthesizing" | "complete" | "failed";

/** One progress message, as the Code Story workers publish it. */
export interface StoryProgress {
  story_id?: string;
  status: StoryStatus;
  /** 0 to 100. */
  progress_percent: number;
  current_step?: string;
  updated_at?: string;
  [extra: string]: unknown;
}

export interface StoryProgressOptions {
  /** Gateway base URL, e.g. `wss://example.com` (no path). */
  url: string;
  /** A story id, or `null` for every story of the user (`/ws/user/stories`). */
  storyId: string | null;
  /** The JWT, sent as `?token=` as the seed's frontend does. */
  token: string;
  onProgress: (progress: StoryProgress) => void;
  /** Called once when the socket stops for good (4001/4003, or `close()`). */
  onStop?: (reason: { code: number; reason: string }) => void;
  WebSocket?: WebSocketConstructor;
  timers?: Timers;
  random?: () => number;
  /** Backoff of reconnects: full jitter up to `initialMs * 2^attempt`, capped at `maxMs`. */
  backoff?: { initialMs?: number; maxMs?: number };
}

const STATUSES: readonly string[] = ["analyzing", "generating", "synthesizing", "complete", "failed"];

/** Whether a parsed frame is a progress message (what the gateway relays is checked already;
 * this keeps a client safe from anything else). */
export function isStoryProgress(v: unknown): v is StoryProgress {
  if (typeof v !== "object" || v === null || Array.isArray(v)) return false;
  const o = v as Record<string, unknown>;
  return (
    typeof o.status === "string" &&
    STATUSES.includes(o.status) &&
    typeof o.progress_percent === "number" &&
    o.progress_percent >= 0 &&
    o.progress_percent <= 100
  );
}

export class StoryProgressSocket {
  private readonly opts: StoryProgressOptions;
  private readonly WS: WebSocketConstructor;
  private readonly timers: Timers;
  private readonly random: () => number;
  private ws: WebSocketLike | null = null;
  private attempt = 0;
  private stopped = false;
  private retry: unknown = null;

  constructor(opts: StoryProgressOptions) {
    this.opts = opts;
    const WS = opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new Error("No WebSocket implementation: pass options.WebSocket");
    this.WS = WS;
    this.timers = opts.timers ?? {
      setTimeout: (f, ms) => setTimeout(f, ms),
      clearTimeout: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
    };
    this.random = opts.random ?? Math.random;
  }

  /** The socket URL: `/ws/stories/{id}/progress?token=` or `/ws/user/stories?token=`. */
  get socketUrl(): string {
    const base = this.opts.url.replace(/\/+$/, "");
    const path =
      this.opts.storyId === null
        ? "/ws/user/stories"
        : `/ws/stories/${encodeURIComponent(this.opts.storyId)}/progress`;
    return `${base}${path}?token=${encodeURIComponent(this.opts.token)}`;
  }

  connect(): void {
    if (this.stopped || this.ws) return;
    const ws = new this.WS(this.socketUrl);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
    };
    ws.onmessage = (ev: { data: unknown }) => {
      if (typeof ev.data !== "string" || ev.data === "ping" || ev.data === "pong") return;
      let parsed: unknown;
      try {
        parsed = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (isStoryProgress(parsed)) this.opts.onProgress(parsed);
    };
    ws.onclose = (ev: { code: number; reason: string }) => {
      this.ws = null;
      if (this.stopped) return;
      if (ev.code === 4001 || ev.code === 4003) {
        this.stop(ev.code, ev.reason);
        return;
      }
      const initial = this.opts.backoff?.initialMs ?? 500;
      const max = this.opts.backoff?.maxMs ?? 30_000;
      const delay = Math.floor(this.random() * Math.min(max, initial * 2 ** this.attempt));
      this.attempt += 1;
      this.retry = this.timers.setTimeout(() => {
        this.retry = null;
        this.connect();
      }, delay);
    };
  }

  /** Asks for the current progress again (the text `status`). False when not open. */
  requestStatus(): boolean {
    return this.sendText("status");
  }

  /** The seed's text `ping`; the gateway answers `pong`. False when not open. */
  ping(): boolean {
    return this.sendText("ping");
  }

  /** Closes for good. */
  close(): void {
    this.stop(1000, "closed by the client");
  }

  private sendText(text: string): boolean {
    try {
      this.ws?.send(text);
      return this.ws !== null;
    } catch {
      return false;
    }
  }

  private stop(code: number, reason: string): void {
    if (this.stopped) return;
    this.stopped = true;
    if (this.retry !== null) this.timers.clearTimeout(this.retry);
    this.ws?.close(1000);
    this.ws = null;
    this.opts.onStop?.({ code, reason });
  }
}
