// Switchboard client: one WebSocket to the gateway, typed events, auto-reconnect with
// resume (last_seq + epoch), commands as promises. See docs/protocol.md §2–§5 and §8.
//
// Only the generic shape of server frames is relied on (`type`, `timestamp`, `project_id`,
// `seq`) plus the few fields of the connection-level and reply messages listed in the
// imports below, so the code keeps compiling when `events.ts` is regenerated.

import type {
  AuthRefreshed,
  CommandAccepted,
  ConnectionClosed,
  ConnectionEstablished,
  ConnectionResyncRequired,
  ContainerReconnect,
  ServerError,
  ServerMessage,
  ServerMessageType,
  Status,
  Subscribed,
  Unsubscribed,
} from "./events.js";

/** The server message whose `type` is `T`. */
export type MessageOf<T extends ServerMessageType> = Extract<ServerMessage, { type: T }>;

/** The subset of the WHATWG WebSocket the client uses (browser, Node ≥ 22, `ws`, fakes). */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  // Event parameters are `any` so that the DOM, undici and `ws` socket types all fit.
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: any) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** Injectable timers (tests use a fake clock). */
export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface BackoffOptions {
  /** First reconnect delay cap in ms (default 500). */
  initialMs?: number;
  /** Largest reconnect delay cap in ms (default 30000). */
  maxMs?: number;
}

export interface SwitchboardClientOptions {
  /** `ws(s)://host/ws/{project_id}` or `ws(s)://host/ws/user` (http(s) is accepted too). */
  url: string;
  /** JWT sent as `?token=` unless the URL already carries `token` or `session`. */
  token?: string;
  /** Returns a fresh JWT; called after a 4004 (credential expired) and before every reconnect. */
  getToken?: () => Promise<string>;
  /** WebSocket implementation (default `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
  backoff?: BackoffOptions;
  /** How long a command / request waits for its answer (default 10000 ms). */
  commandTimeoutMs?: number;
  /** Random source in [0, 1) for the backoff jitter (default Math.random). */
  random?: () => number;
  /** Timer functions (default the global ones). */
  timers?: Timers;
}

/** Close codes of docs/protocol.md §5 (plus the client's own liveness close). */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  UNSUPPORTED_DATA: 1003,
  NO_STATUS: 1005,
  ABNORMAL: 1006,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  RESTART: 1012,
  /** The server could not check the credential right now (session store unreachable):
   * not a denial, reconnect with backoff (docs/protocol.md §2). */
  TRY_AGAIN_LATER: 1013,
  /** Sent by this client when the server stayed silent for 2.5 heartbeats. */
  LIVENESS_TIMEOUT: 4000,
  UNAUTHENTICATED: 4001,
  FORBIDDEN: 4003,
  CREDENTIAL_EXPIRED: 4004,
  RATE_LIMITED: 4029,
  SLOW_CONSUMER: 4500,
} as const;

/** Why the client stopped for good (no more reconnects until `connect()` is called again). */
export type StopReason =
  | "closed" // close() was called
  | "unauthenticated" // 4001
  | "forbidden" // 4003
  | "credential_expired" // 4004 without getToken
  | "rate_limited" // 4029
  | "protocol_error"; // 1003, 1008, 1009: the client sent something the server refuses

export type CloseAction =
  | { kind: "stop"; reason: StopReason }
  | { kind: "reconnect"; freshToken: boolean };

/** What the client does after a close with `code` (docs/protocol.md §5). */
export function closeAction(code: number, hasGetToken: boolean): CloseAction {
  switch (code) {
    case CloseCode.UNAUTHENTICATED:
      return { kind: "stop", reason: "unauthenticated" };
    case CloseCode.FORBIDDEN:
      return { kind: "stop", reason: "forbidden" };
    case CloseCode.CREDENTIAL_EXPIRED:
      return hasGetToken
        ? { kind: "reconnect", freshToken: true }
        : { kind: "stop", reason: "credential_expired" };
    case CloseCode.RATE_LIMITED:
      return { kind: "stop", reason: "rate_limited" };
    case CloseCode.UNSUPPORTED_DATA:
    case CloseCode.POLICY:
    case CloseCode.TOO_BIG:
      return { kind: "stop", reason: "protocol_error" };
    case CloseCode.TRY_AGAIN_LATER:
      // An outage of the server's credential store, not a verdict on the credential: retry
      // with the growing backoff (no `connection.established` came, so it does not reset).
      return { kind: "reconnect", freshToken: hasGetToken };
    default:
      // 1012 / 4500: reconnect and resume; 1000 from the server, 1001, 1006, 1011, ...:
      // reconnect with backoff.
      return { kind: "reconnect", freshToken: hasGetToken };
  }
}

export interface LifecycleEvents {
  /** The socket opened (the server's `connection.established` follows). */
  open: { url: string };
  /** The socket closed. `code` is the close code (or the `connection.closed` frame's code
   * when the transport lost it). */
  close: { code: number; reason: string; wasClean: boolean };
  /** A reconnect is scheduled in `delay` ms. */
  reconnecting: { delay: number; attempt: number; code: number };
  /** History no longer covers the gap: refetch state. A `status` frame follows. */
  resync: ConnectionResyncRequired;
  /** The client stopped for good. */
  stopped: { reason: StopReason; code: number };
  /** A listener threw, getToken failed or a re-subscribe was refused. Never thrown to the
   * caller. (Named so as not to clash with the server's `error` message.) */
  clientError: unknown;
}
export type LifecycleEvent = keyof LifecycleEvents;

export type ClientState = "idle" | "connecting" | "connected" | "reconnecting" | "stopped";

/** Error codes produced by the client itself (server codes are passed through). */
export type ClientErrorCode = "timeout" | "disconnected" | "not_connected" | "closed" | "send_failed";

/** A rejected command or request: a server `error` frame, a timeout or a lost connection. */
export class SwitchboardError extends Error {
  override readonly name = "SwitchboardError";
  /** Server error code (`broker_unavailable`, `forbidden`, `invalid_message`, `rate_limited`,
   * ...) or a client code (`timeout`, `disconnected`, `not_connected`, `closed`, `send_failed`). */
  readonly code: string;
  readonly field?: string;
  readonly requestId?: string;
  /** Close code of the connection that dropped (for `disconnected`). */
  readonly closeCode?: number;
  /** The server's `error` frame, when there was one. */
  readonly frame?: ServerError;

  constructor(
    code: ClientErrorCode | (string & {}),
    message: string,
    extra: { field?: string; requestId?: string; closeCode?: number; frame?: ServerError } = {},
  ) {
    super(message);
    this.code = code;
    if (extra.field !== undefined) this.field = extra.field;
    if (extra.requestId !== undefined) this.requestId = extra.requestId;
    if (extra.closeCode !== undefined) this.closeCode = extra.closeCode;
    if (extra.frame !== undefined) this.frame = extra.frame;
  }
}

/** Frames that are not sequenced project events (never deduplicated by `seq`). */
const CONTROL_TYPES: ReadonlySet<string> = new Set([
  "connection.established",
  "connection.closed",
  "connection.resync_required",
  "system.heartbeat",
  "container.reconnect",
  "pong",
  "status",
  "command.accepted",
  "subscribed",
  "unsubscribed",
  "auth.refreshed",
  "error",
]);

type RequestKind = "command" | "subscribe" | "unsubscribe" | "auth" | "status" | "ping";

interface Pending {
  kind: RequestKind;
  requestId?: string;
  projectId?: string;
  settled: boolean;
  timer: unknown;
  resolve(msg: ServerMessage): void;
  reject(err: SwitchboardError): void;
}

interface Position {
  seq?: number;
  epoch?: string;
}

type AnyFn = (arg: any) => void;

const defaultTimers: Timers = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (h) => globalThis.clearTimeout(h as Parameters<typeof globalThis.clearTimeout>[0]),
};

let requestCounter = 0;
function newRequestId(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  requestCounter += 1;
  return `${Date.now().toString(36)}-${requestCounter.toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function normaliseUrl(raw: string): URL {
  const base = (globalThis as { location?: { href?: string } }).location?.href;
  const u = base ? new URL(raw, base) : new URL(raw);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new TypeError(`Switchboard url must be ws:, wss:, http: or https:, got ${u.protocol}`);
  }
  return u;
}

export class SwitchboardClient {
  private readonly baseUrl: URL;
  /** The project of a `/ws/{project_id}` URL; undefined for `/ws/user`. */
  private readonly urlProject: string | undefined;
  private readonly urlHasCredentials: boolean;
  private readonly WS: WebSocketConstructor | undefined;
  private readonly getToken: (() => Promise<string>) | undefined;
  private readonly initialMs: number;
  private readonly maxMs: number;
  private readonly commandTimeoutMs: number;
  private readonly random: () => number;
  private readonly timers: Timers;

  private token: string | undefined;
  private ws: WebSocketLike | null = null;
  private _state: ClientState = "idle";
  /** Bumped whenever an in-flight async step (getToken) must be abandoned. */
  private generation = 0;
  private attempt = 0;
  private reconnectTimer: unknown = undefined;
  private livenessTimer: unknown = undefined;
  private heartbeatMs = 30_000;
  private nextDelayOverride: number | undefined;
  private closedFrame: { code: number; reason: string } | undefined;
  private established: ConnectionEstablished | undefined;
  private readonly positions = new Map<string, Position>();
  /** Projects added with subscribe(): re-subscribed after every reconnect. */
  private readonly extraProjects = new Set<string>();
  private outstanding: Pending[] = [];

  private readonly messageListeners = new Map<string, Set<AnyFn>>();
  private readonly anyListeners = new Set<(msg: ServerMessage) => void>();
  private readonly lifecycleListeners = new Map<string, Set<AnyFn>>();

  constructor(options: SwitchboardClientOptions) {
    this.baseUrl = normaliseUrl(options.url);
    const m = /\/ws\/([^/]+)\/?$/.exec(this.baseUrl.pathname);
    const project = m?.[1] !== undefined ? decodeURIComponent(m[1]) : undefined;
    this.urlProject = project === "user" ? undefined : project;
    this.urlHasCredentials =
      this.baseUrl.searchParams.has("token") || this.baseUrl.searchParams.has("session");
    this.WS =
      options.WebSocket ??
      (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket ??
      undefined;
    this.token = options.token;
    this.getToken = options.getToken;
    this.initialMs = options.backoff?.initialMs ?? 500;
    this.maxMs = options.backoff?.maxMs ?? 30_000;
    this.commandTimeoutMs = options.commandTimeoutMs ?? 10_000;
    this.random = options.random ?? Math.random;
    this.timers = options.timers ?? defaultTimers;
  }

  // ---- public state ---------------------------------------------------------------

  get state(): ClientState {
    return this._state;
  }

  /** The last `connection.established` of the current connection (undefined when down). */
  get connection(): ConnectionEstablished | undefined {
    return this.established;
  }

  /** Last seen seq and epoch of a project (default: the URL's project). */
  position(projectId?: string): { seq?: number; epoch?: string } {
    const p = this.positions.get(projectId ?? this.urlProject ?? "");
    return p ? { ...p } : {};
  }

  // ---- listeners ------------------------------------------------------------------

  /** Lifecycle event (`open`, `close`, `reconnecting`, `resync`, `stopped`, `clientError`). */
  on<K extends LifecycleEvent>(event: K, fn: (e: LifecycleEvents[K]) => void): () => void;
  /** Server message of one type. Returns an unsubscribe function. */
  on<T extends ServerMessageType>(type: T, fn: (msg: MessageOf<T>) => void): () => void;
  on(name: string, fn: AnyFn): () => void {
    const map = isLifecycle(name) ? this.lifecycleListeners : this.messageListeners;
    let set = map.get(name);
    if (!set) {
      set = new Set();
      map.set(name, set);
    }
    set.add(fn);
    return () => {
      map.get(name)?.delete(fn);
    };
  }

  /** Every server message delivered (after duplicate suppression). */
  onAny(fn: (msg: ServerMessage) => void): () => void {
    this.anyListeners.add(fn);
    return () => {
      this.anyListeners.delete(fn);
    };
  }

  // ---- connection -----------------------------------------------------------------

  /** Opens the connection (no-op while connecting or connected). */
  connect(): void {
    if (this._state !== "idle" && this._state !== "stopped") return;
    if (!this.WS) {
      throw new TypeError(
        "No WebSocket implementation: pass options.WebSocket (e.g. from the `ws` package)",
      );
    }
    this.generation += 1;
    this.attempt = 0;
    this.nextDelayOverride = undefined;
    this._state = "connecting";
    void this.startAttempt(this.token === undefined && this.getToken !== undefined);
  }

  /** Closes with 1000 and stops reconnecting. Pending requests reject with `closed`. */
  close(): void {
    if (this._state === "idle" || this._state === "stopped") return;
    const ws = this.ws;
    this.halt();
    if (ws) {
      try {
        ws.close(CloseCode.NORMAL, "client closed");
      } catch {
        /* already closing */
      }
    }
    this.failPending("closed", "the client was closed", CloseCode.NORMAL);
    if (ws) this.emit("close", { code: CloseCode.NORMAL, reason: "client closed", wasClean: true });
    this.emit("stopped", { reason: "closed", code: CloseCode.NORMAL });
  }

  // ---- requests -------------------------------------------------------------------

  /** `node.execute`: resolves on `command.accepted`, rejects with a SwitchboardError. */
  execute(
    nodeId: string,
    parameters: Record<string, unknown> = {},
    opts: { projectId?: string; requestId?: string; timeoutMs?: number } = {},
  ): Promise<CommandAccepted> {
    const requestId = opts.requestId ?? newRequestId();
    const frame: Record<string, unknown> = {
      type: "node.execute",
      node_id: nodeId,
      parameters,
      request_id: requestId,
    };
    if (opts.projectId !== undefined) frame["project_id"] = opts.projectId;
    return this.request<CommandAccepted>({ kind: "command", requestId }, frame, opts.timeoutMs);
  }

  /** `task.cancel`: resolves on `command.accepted`, rejects with a SwitchboardError. */
  cancelTask(
    taskId: string,
    opts: { projectId?: string; requestId?: string; timeoutMs?: number } = {},
  ): Promise<CommandAccepted> {
    const requestId = opts.requestId ?? newRequestId();
    const frame: Record<string, unknown> = { type: "task.cancel", task_id: taskId, request_id: requestId };
    if (opts.projectId !== undefined) frame["project_id"] = opts.projectId;
    return this.request<CommandAccepted>({ kind: "command", requestId }, frame, opts.timeoutMs);
  }

  /** Adds a project to this connection (kept across reconnects). */
  async subscribe(projectId: string): Promise<Subscribed> {
    const reply = await this.request<Subscribed>(
      { kind: "subscribe", projectId },
      { type: "subscribe", project_id: projectId },
    );
    this.extraProjects.add(projectId);
    return reply;
  }

  /** Drops a project from this connection. */
  async unsubscribe(projectId: string): Promise<Unsubscribed> {
    this.extraProjects.delete(projectId);
    return this.request<Unsubscribed>(
      { kind: "unsubscribe", projectId },
      { type: "unsubscribe", project_id: projectId },
    );
  }

  /** `auth.refresh`: extends the connection's credential; also used for later reconnects. */
  refreshAuth(token: string): Promise<AuthRefreshed> {
    this.token = token;
    return this.request<AuthRefreshed>({ kind: "auth" }, { type: "auth.refresh", token });
  }

  /** Asks for a `status` snapshot. */
  requestStatus(opts: { projectId?: string } = {}): Promise<Status> {
    const frame: Record<string, unknown> = { type: "status" };
    if (opts.projectId !== undefined) frame["project_id"] = opts.projectId;
    return this.request<Status>({ kind: "status" }, frame);
  }

  /** JSON ping; resolves with the round-trip time in ms. */
  async ping(): Promise<number> {
    const sentAt = Date.now();
    await this.request({ kind: "ping" }, { type: "ping" });
    return Date.now() - sentAt;
  }

  // ---- internals: connecting ------------------------------------------------------

  private async startAttempt(freshToken: boolean): Promise<void> {
    if (freshToken && this.getToken) {
      const gen = this.generation;
      let token: string;
      try {
        token = await this.getToken();
      } catch (err) {
        if (gen !== this.generation) return;
        this.emit("clientError", err);
        this.scheduleReconnect(CloseCode.ABNORMAL);
        return;
      }
      if (gen !== this.generation) return;
      this.token = token;
    }
    this.openSocket();
  }

  private connectUrl(): string {
    const u = new URL(this.baseUrl.href);
    u.searchParams.delete("last_seq");
    u.searchParams.delete("epoch");
    if (this.urlProject !== undefined) {
      const pos = this.positions.get(this.urlProject);
      if (pos?.seq !== undefined) {
        u.searchParams.set("last_seq", String(pos.seq));
        if (pos.epoch !== undefined) u.searchParams.set("epoch", pos.epoch);
      }
    }
    if (!this.urlHasCredentials && this.token !== undefined) {
      u.searchParams.set("token", this.token);
    }
    return u.href;
  }

  private openSocket(): void {
    const url = this.connectUrl();
    const Ctor = this.WS as WebSocketConstructor;
    this._state = "connecting";
    this.closedFrame = undefined;
    let ws: WebSocketLike;
    try {
      ws = new Ctor(url);
    } catch (err) {
      this.emit("clientError", err);
      this.scheduleReconnect(CloseCode.ABNORMAL);
      return;
    }
    this.ws = ws;
    try {
      (ws as { binaryType?: string }).binaryType = "arraybuffer";
    } catch {
      /* not supported */
    }
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.armLiveness();
      this.emit("open", { url });
    };
    ws.onmessage = (ev: { data?: unknown } | undefined) => {
      if (this.ws !== ws) return;
      this.armLiveness();
      this.handleData(ev?.data);
    };
    ws.onerror = () => {
      // Browsers follow an error with a close (1006), but some implementations (Node 20's
      // undici on a refused connection) never do: treat the error as that close.
      if (this.ws !== ws) return;
      this.detach();
      try {
        ws.close();
      } catch {
        /* ignore */
      }
      this.onClosed(CloseCode.ABNORMAL, "socket error", false);
    };
    ws.onclose = (ev: { code?: unknown; reason?: unknown; wasClean?: unknown } | undefined) => {
      if (this.ws !== ws) return;
      this.detach();
      const code = typeof ev?.code === "number" ? ev.code : CloseCode.ABNORMAL;
      const reason = typeof ev?.reason === "string" ? ev.reason : "";
      this.onClosed(code, reason, ev?.wasClean === true);
    };
    this.armLiveness();
  }

  /** Forgets the current socket: no more events from it. */
  private detach(): void {
    const ws = this.ws;
    this.ws = null;
    this.established = undefined;
    this.clearLiveness();
    if (ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = null;
    }
  }

  /** Stops everything (timers, socket, async steps) without emitting. */
  private halt(): void {
    this.generation += 1;
    this._state = "stopped";
    if (this.reconnectTimer !== undefined) {
      this.timers.clearTimeout(this.reconnectTimer);
      this.reconnectTimer = undefined;
    }
    this.detach();
  }

  private onClosed(rawCode: number, reason: string, wasClean: boolean): void {
    let code = rawCode;
    // A proxy or a dying transport may lose the close code; the server said it first.
    if ((code === CloseCode.ABNORMAL || code === CloseCode.NO_STATUS) && this.closedFrame) {
      code = this.closedFrame.code;
      reason = reason || this.closedFrame.reason;
    }
    this.closedFrame = undefined;
    this.failPending("disconnected", `connection closed (${code})`, code);
    this.emit("close", { code, reason, wasClean });
    if (this._state === "stopped") return; // a listener called close()
    const action = closeAction(code, this.getToken !== undefined);
    if (action.kind === "stop") {
      this.halt();
      this.emit("stopped", { reason: action.reason, code });
      return;
    }
    this.scheduleReconnect(code);
  }

  /** Full-jitter exponential backoff, or the server's `reconnect_after_ms`. */
  private scheduleReconnect(code: number): void {
    let delay: number;
    if (this.nextDelayOverride !== undefined) {
      delay = this.nextDelayOverride;
      this.nextDelayOverride = undefined;
    } else {
      const cap = Math.min(this.maxMs, this.initialMs * 2 ** this.attempt);
      delay = Math.floor(this.random() * cap);
    }
    const attempt = this.attempt;
    this.attempt += 1;
    this._state = "reconnecting";
    const gen = this.generation;
    this.reconnectTimer = this.timers.setTimeout(() => {
      this.reconnectTimer = undefined;
      if (gen !== this.generation || this._state !== "reconnecting") return;
      this._state = "connecting";
      void this.startAttempt(this.getToken !== undefined);
    }, delay);
    this.emit("reconnecting", { delay, attempt, code });
  }

  // ---- internals: liveness ---------------------------------------------------------

  private armLiveness(): void {
    this.clearLiveness();
    this.livenessTimer = this.timers.setTimeout(() => this.onLivenessTimeout(), this.heartbeatMs * 2.5);
  }

  private clearLiveness(): void {
    if (this.livenessTimer !== undefined) {
      this.timers.clearTimeout(this.livenessTimer);
      this.livenessTimer = undefined;
    }
  }

  private onLivenessTimeout(): void {
    this.livenessTimer = undefined;
    const ws = this.ws;
    if (!ws) return;
    this.detach();
    try {
      ws.close(CloseCode.LIVENESS_TIMEOUT, "liveness timeout");
    } catch {
      /* ignore */
    }
    this.onClosed(CloseCode.LIVENESS_TIMEOUT, "liveness timeout", false);
  }

  // ---- internals: incoming ---------------------------------------------------------

  private handleData(data: unknown): void {
    let text: string;
    if (typeof data === "string") {
      text = data;
    } else if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) {
      try {
        text = new TextDecoder().decode(data as ArrayBuffer);
      } catch {
        return;
      }
    } else {
      return;
    }
    if (text === "pong") return; // answer to a text `ping`
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      return;
    }
    if (!isRecord(parsed) || typeof parsed["type"] !== "string") return;
    try {
      this.handleMessage(parsed as unknown as ServerMessage);
    } catch (err) {
      this.emit("clientError", err);
    }
  }

  private handleMessage(msg: ServerMessage): void {
    const type: string = msg.type;
    const loose = msg as unknown as Record<string, unknown>;
    const project = typeof msg.project_id === "string" ? msg.project_id : this.urlProject;
    let resync: ConnectionResyncRequired | undefined;

    switch (type) {
      case "connection.established":
        this.onEstablished(msg as ConnectionEstablished);
        break;
      case "connection.resync_required": {
        resync = msg as ConnectionResyncRequired;
        if (project !== undefined) {
          const epoch = typeof resync.epoch === "string" ? resync.epoch : undefined;
          // The seq is taken from the `status` frame that follows (or the next event).
          this.positions.set(project, epoch !== undefined ? { epoch } : {});
        }
        break;
      }
      case "connection.closed": {
        const c = msg as ConnectionClosed;
        if (typeof c.code === "number") {
          this.closedFrame = { code: c.code, reason: typeof c.reason === "string" ? c.reason : "" };
        }
        break;
      }
      case "container.reconnect": {
        const ms = (msg as ContainerReconnect).reconnect_after_ms;
        if (typeof ms === "number" && Number.isFinite(ms) && ms >= 0) this.nextDelayOverride = ms;
        break;
      }
      case "status": {
        // After a resync (or on a connection without a position) the snapshot's seq is the
        // point the following live events continue from.
        if (project !== undefined && typeof msg.seq === "number") {
          const epoch = loose["epoch"];
          let pos = this.positions.get(project);
          if (!pos) {
            pos = {};
            this.positions.set(project, pos);
          }
          if (pos.seq === undefined) pos.seq = msg.seq;
          if (pos.epoch === undefined && typeof epoch === "string") pos.epoch = epoch;
        }
        break;
      }
      case "subscribed": {
        // Only the epoch is adopted: events racing the reply may carry seqs below the
        // reply's `seq` and must not be dropped.
        const p = (msg as Subscribed).project_id;
        const epoch = loose["epoch"];
        if (typeof p === "string" && typeof epoch === "string") {
          const pos = this.positions.get(p);
          if (!pos || pos.epoch !== epoch) this.positions.set(p, { epoch });
        }
        break;
      }
      default:
        if (!CONTROL_TYPES.has(type) && typeof msg.seq === "number") {
          const key = project ?? "";
          let pos = this.positions.get(key);
          if (!pos) {
            pos = {};
            this.positions.set(key, pos);
          }
          if (pos.seq !== undefined && msg.seq <= pos.seq) return; // duplicate (replay overlap)
          pos.seq = msg.seq;
        }
    }

    this.settleReply(msg);

    const set = this.messageListeners.get(type);
    if (set) for (const fn of [...set]) this.call(fn, msg);
    for (const fn of [...this.anyListeners]) this.call(fn, msg);
    if (resync) this.emit("resync", resync);
  }

  private onEstablished(msg: ConnectionEstablished): void {
    this._state = "connected";
    this.established = msg;
    this.attempt = 0;
    this.nextDelayOverride = undefined;
    const hb = msg.heartbeat_interval;
    this.heartbeatMs = (typeof hb === "number" && hb > 0 ? hb : 30) * 1000;
    this.armLiveness();

    const project = typeof msg.project_id === "string" ? msg.project_id : this.urlProject;
    if (project !== undefined) {
      this.adoptPosition(project, msg.seq, msg.epoch, msg.resumed === true);
    }
    // `/ws/user` (docs/protocol.md §8): `positions: {project: {seq, epoch}}` instead of seq/epoch.
    const positions = (msg as unknown as Record<string, unknown>)["positions"];
    if (isRecord(positions)) {
      for (const [p, v] of Object.entries(positions)) {
        if (isRecord(v)) this.adoptPosition(p, v["seq"], v["epoch"], msg.resumed === true);
      }
    }

    for (const p of this.extraProjects) {
      this.request<Subscribed>({ kind: "subscribe", projectId: p }, { type: "subscribe", project_id: p }).catch(
        (err: unknown) => {
          if (err instanceof SwitchboardError && err.code === "forbidden") this.extraProjects.delete(p);
          this.emit("clientError", err);
        },
      );
    }
  }

  /** Position announced by `connection.established`: kept when the server resumes (the
   * replay after last_seq follows), otherwise the project's current position. */
  private adoptPosition(project: string, seq: unknown, epoch: unknown, resumed: boolean): void {
    if (typeof epoch !== "string") return;
    const pos = this.positions.get(project);
    if (resumed && pos?.seq !== undefined) {
      pos.epoch = epoch;
      return;
    }
    const fresh: Position = { epoch };
    if (typeof seq === "number") fresh.seq = seq;
    this.positions.set(project, fresh);
  }

  // ---- internals: requests ---------------------------------------------------------

  private request<T extends ServerMessage>(
    what: { kind: RequestKind; requestId?: string; projectId?: string },
    frame: Record<string, unknown>,
    timeoutMs: number = this.commandTimeoutMs,
  ): Promise<T> {
    const ws = this.ws;
    if (this._state !== "connected" || !ws) {
      return Promise.reject(
        new SwitchboardError("not_connected", "not connected", what.requestId !== undefined ? { requestId: what.requestId } : {}),
      );
    }
    return new Promise<T>((resolve, reject) => {
      const p: Pending = {
        kind: what.kind,
        settled: false,
        timer: undefined,
        resolve: resolve as (msg: ServerMessage) => void,
        reject,
      };
      if (what.requestId !== undefined) p.requestId = what.requestId;
      if (what.projectId !== undefined) p.projectId = what.projectId;
      p.timer = this.timers.setTimeout(() => {
        p.timer = undefined;
        if (p.settled) return;
        // Stays queued (settled) so that a late answer is not taken for another one's.
        p.settled = true;
        p.reject(
          new SwitchboardError("timeout", `no answer within ${timeoutMs} ms`, requestExtra(p)),
        );
      }, timeoutMs);
      this.outstanding.push(p);
      try {
        ws.send(JSON.stringify(frame));
      } catch (err) {
        this.outstanding = this.outstanding.filter((q) => q !== p);
        this.finish(p);
        reject(new SwitchboardError("send_failed", String(err), requestExtra(p)));
      }
    });
  }

  /** The server answers a connection's messages in order; match replies to requests. */
  private settleReply(msg: ServerMessage): void {
    if (this.outstanding.length === 0) return;
    const loose = msg as unknown as Record<string, unknown>;
    let idx = -1;
    switch (msg.type as string) {
      case "command.accepted": {
        const rid = (msg as CommandAccepted).request_id;
        idx = this.outstanding.findIndex((p) => p.kind === "command" && p.requestId === rid);
        break;
      }
      case "error": {
        const rid = (msg as ServerError).request_id;
        idx =
          typeof rid === "string"
            ? this.outstanding.findIndex((p) => p.requestId === rid)
            : 0; // errors without request_id answer the oldest unanswered message
        break;
      }
      case "subscribed":
      case "unsubscribed": {
        const kind: RequestKind = msg.type === "subscribed" ? "subscribe" : "unsubscribe";
        const pid = loose["project_id"];
        idx = this.outstanding.findIndex((p) => p.kind === kind && p.projectId === pid);
        break;
      }
      case "auth.refreshed":
        idx = this.outstanding.findIndex((p) => p.kind === "auth");
        break;
      case "status":
        // An unsolicited snapshot may come first; only the head can be our answer.
        idx = this.outstanding[0]?.kind === "status" ? 0 : -1;
        break;
      case "pong":
        idx = this.outstanding.findIndex((p) => p.kind === "ping");
        break;
      default:
        return;
    }
    if (idx < 0) return;
    const [p] = this.outstanding.splice(idx, 1);
    if (!p || p.settled) return;
    this.finish(p);
    if (msg.type === "error") {
      const e = msg as ServerError;
      const extra: { field?: string; requestId?: string; frame: ServerError } = { frame: e };
      if (typeof e.field === "string") extra.field = e.field;
      const rid = typeof e.request_id === "string" ? e.request_id : p.requestId;
      if (rid !== undefined) extra.requestId = rid;
      p.reject(
        new SwitchboardError(
          typeof e.code === "string" ? e.code : "error",
          typeof e.message === "string" ? e.message : "server error",
          extra,
        ),
      );
    } else {
      p.resolve(msg);
    }
  }

  private finish(p: Pending): void {
    p.settled = true;
    if (p.timer !== undefined) {
      this.timers.clearTimeout(p.timer);
      p.timer = undefined;
    }
  }

  private failPending(code: ClientErrorCode, message: string, closeCode: number): void {
    const pending = this.outstanding;
    this.outstanding = [];
    for (const p of pending) {
      if (p.settled) continue;
      this.finish(p);
      p.reject(new SwitchboardError(code, message, { ...requestExtra(p), closeCode }));
    }
  }

  // ---- internals: emitting ---------------------------------------------------------

  private emit<K extends LifecycleEvent>(event: K, payload: LifecycleEvents[K]): void {
    const set = this.lifecycleListeners.get(event);
    if (!set || set.size === 0) {
      if (event === "clientError") {
        (globalThis as { console?: { error?: (...a: unknown[]) => void } }).console?.error?.(
          "[switchboard]",
          payload,
        );
      }
      return;
    }
    for (const fn of [...set]) {
      try {
        fn(payload);
      } catch (err) {
        if (event !== "clientError") this.emit("clientError", err);
      }
    }
  }

  private call(fn: AnyFn, msg: ServerMessage): void {
    try {
      fn(msg);
    } catch (err) {
      this.emit("clientError", err);
    }
  }
}

function isLifecycle(name: string): name is LifecycleEvent {
  return (
    name === "open" ||
    name === "close" ||
    name === "reconnecting" ||
    name === "resync" ||
    name === "stopped" ||
    name === "clientError"
  );
}

function requestExtra(p: Pending): { requestId?: string } {
  return p.requestId !== undefined ? { requestId: p.requestId } : {};
}
