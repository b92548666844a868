// GENERATED from clients/typescript/src by clients/typescript/scripts/bundle.mjs. Do not edit:
// run `npm run bundle` in clients/typescript (the tests fail while this file is stale).

// clients/typescript/src/client.ts
var CloseCode = {
  NORMAL: 1e3,
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
  LIVENESS_TIMEOUT: 4e3,
  UNAUTHENTICATED: 4001,
  FORBIDDEN: 4003,
  CREDENTIAL_EXPIRED: 4004,
  RATE_LIMITED: 4029,
  SLOW_CONSUMER: 4500
};
function closeAction(code, hasGetToken) {
  switch (code) {
    case CloseCode.UNAUTHENTICATED:
      return { kind: "stop", reason: "unauthenticated" };
    case CloseCode.FORBIDDEN:
      return { kind: "stop", reason: "forbidden" };
    case CloseCode.CREDENTIAL_EXPIRED:
      return hasGetToken ? { kind: "reconnect", freshToken: true } : { kind: "stop", reason: "credential_expired" };
    case CloseCode.RATE_LIMITED:
      return { kind: "stop", reason: "rate_limited" };
    case CloseCode.UNSUPPORTED_DATA:
    case CloseCode.POLICY:
    case CloseCode.TOO_BIG:
      return { kind: "stop", reason: "protocol_error" };
    case CloseCode.TRY_AGAIN_LATER:
      return { kind: "reconnect", freshToken: hasGetToken };
    default:
      return { kind: "reconnect", freshToken: hasGetToken };
  }
}
var SwitchboardError = class extends Error {
  name = "SwitchboardError";
  /** Server error code (`broker_unavailable`, `forbidden`, `invalid_message`, `rate_limited`,
   * ...) or a client code (`timeout`, `disconnected`, `not_connected`, `closed`, `send_failed`). */
  code;
  field;
  requestId;
  /** Close code of the connection that dropped (for `disconnected`). */
  closeCode;
  /** The server's `error` frame, when there was one. */
  frame;
  constructor(code, message, extra = {}) {
    super(message);
    this.code = code;
    if (extra.field !== void 0) this.field = extra.field;
    if (extra.requestId !== void 0) this.requestId = extra.requestId;
    if (extra.closeCode !== void 0) this.closeCode = extra.closeCode;
    if (extra.frame !== void 0) this.frame = extra.frame;
  }
};
var CONTROL_TYPES = /* @__PURE__ */ new Set([
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
  "error"
]);
var defaultTimers = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (h) => globalThis.clearTimeout(h)
};
var requestCounter = 0;
function newRequestId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  requestCounter += 1;
  return `${Date.now().toString(36)}-${requestCounter.toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}
function isRecord(v) {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
function normaliseUrl(raw) {
  const base = globalThis.location?.href;
  const u = base ? new URL(raw, base) : new URL(raw);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new TypeError(`Switchboard url must be ws:, wss:, http: or https:, got ${u.protocol}`);
  }
  return u;
}
var SwitchboardClient = class {
  baseUrl;
  /** The project of a `/ws/{project_id}` URL; undefined for `/ws/user`. */
  urlProject;
  urlHasCredentials;
  WS;
  getToken;
  initialMs;
  maxMs;
  commandTimeoutMs;
  random;
  timers;
  token;
  ws = null;
  _state = "idle";
  /** Bumped whenever an in-flight async step (getToken) must be abandoned. */
  generation = 0;
  attempt = 0;
  reconnectTimer = void 0;
  livenessTimer = void 0;
  heartbeatMs = 3e4;
  nextDelayOverride;
  closedFrame;
  established;
  positions = /* @__PURE__ */ new Map();
  /** Projects added with subscribe(): re-subscribed after every reconnect. */
  extraProjects = /* @__PURE__ */ new Set();
  outstanding = [];
  messageListeners = /* @__PURE__ */ new Map();
  anyListeners = /* @__PURE__ */ new Set();
  lifecycleListeners = /* @__PURE__ */ new Map();
  constructor(options) {
    this.baseUrl = normaliseUrl(options.url);
    const m = /\/ws\/([^/]+)\/?$/.exec(this.baseUrl.pathname);
    const project = m?.[1] !== void 0 ? decodeURIComponent(m[1]) : void 0;
    this.urlProject = project === "user" ? void 0 : project;
    this.urlHasCredentials = this.baseUrl.searchParams.has("token") || this.baseUrl.searchParams.has("session");
    this.WS = options.WebSocket ?? globalThis.WebSocket ?? void 0;
    this.token = options.token;
    this.getToken = options.getToken;
    this.initialMs = options.backoff?.initialMs ?? 500;
    this.maxMs = options.backoff?.maxMs ?? 3e4;
    this.commandTimeoutMs = options.commandTimeoutMs ?? 1e4;
    this.random = options.random ?? Math.random;
    this.timers = options.timers ?? defaultTimers;
  }
  // ---- public state ---------------------------------------------------------------
  get state() {
    return this._state;
  }
  /** The last `connection.established` of the current connection (undefined when down). */
  get connection() {
    return this.established;
  }
  /** Last seen seq and epoch of a project (default: the URL's project). */
  position(projectId) {
    const p = this.positions.get(projectId ?? this.urlProject ?? "");
    return p ? { ...p } : {};
  }
  on(name, fn) {
    const map = isLifecycle(name) ? this.lifecycleListeners : this.messageListeners;
    let set = map.get(name);
    if (!set) {
      set = /* @__PURE__ */ new Set();
      map.set(name, set);
    }
    set.add(fn);
    return () => {
      map.get(name)?.delete(fn);
    };
  }
  /** Every server message delivered (after duplicate suppression). */
  onAny(fn) {
    this.anyListeners.add(fn);
    return () => {
      this.anyListeners.delete(fn);
    };
  }
  // ---- connection -----------------------------------------------------------------
  /** Opens the connection (no-op while connecting or connected). */
  connect() {
    if (this._state !== "idle" && this._state !== "stopped") return;
    if (!this.WS) {
      throw new TypeError(
        "No WebSocket implementation: pass options.WebSocket (e.g. from the `ws` package)"
      );
    }
    this.generation += 1;
    this.attempt = 0;
    this.nextDelayOverride = void 0;
    this._state = "connecting";
    void this.startAttempt(this.token === void 0 && this.getToken !== void 0);
  }
  /** Closes with 1000 and stops reconnecting. Pending requests reject with `closed`. */
  close() {
    if (this._state === "idle" || this._state === "stopped") return;
    const ws = this.ws;
    this.halt();
    if (ws) {
      try {
        ws.close(CloseCode.NORMAL, "client closed");
      } catch {
      }
    }
    this.failPending("closed", "the client was closed", CloseCode.NORMAL);
    if (ws) this.emit("close", { code: CloseCode.NORMAL, reason: "client closed", wasClean: true });
    this.emit("stopped", { reason: "closed", code: CloseCode.NORMAL });
  }
  // ---- requests -------------------------------------------------------------------
  /** `node.execute`: resolves on `command.accepted`, rejects with a SwitchboardError. */
  execute(nodeId, parameters = {}, opts = {}) {
    const requestId = opts.requestId ?? newRequestId();
    const frame = {
      type: "node.execute",
      node_id: nodeId,
      parameters,
      request_id: requestId
    };
    if (opts.projectId !== void 0) frame["project_id"] = opts.projectId;
    return this.request({ kind: "command", requestId }, frame, opts.timeoutMs);
  }
  /** `task.cancel`: resolves on `command.accepted`, rejects with a SwitchboardError. */
  cancelTask(taskId, opts = {}) {
    const requestId = opts.requestId ?? newRequestId();
    const frame = { type: "task.cancel", task_id: taskId, request_id: requestId };
    if (opts.projectId !== void 0) frame["project_id"] = opts.projectId;
    return this.request({ kind: "command", requestId }, frame, opts.timeoutMs);
  }
  /** Adds a project to this connection (kept across reconnects). */
  async subscribe(projectId) {
    const reply = await this.request(
      { kind: "subscribe", projectId },
      { type: "subscribe", project_id: projectId }
    );
    this.extraProjects.add(projectId);
    return reply;
  }
  /** Drops a project from this connection. */
  async unsubscribe(projectId) {
    this.extraProjects.delete(projectId);
    return this.request(
      { kind: "unsubscribe", projectId },
      { type: "unsubscribe", project_id: projectId }
    );
  }
  /** `auth.refresh`: extends the connection's credential; also used for later reconnects. */
  refreshAuth(token) {
    this.token = token;
    return this.request({ kind: "auth" }, { type: "auth.refresh", token });
  }
  /** Asks for a `status` snapshot. */
  requestStatus(opts = {}) {
    const frame = { type: "status" };
    if (opts.projectId !== void 0) frame["project_id"] = opts.projectId;
    return this.request({ kind: "status" }, frame);
  }
  /** JSON ping; resolves with the round-trip time in ms. */
  async ping() {
    const sentAt = Date.now();
    await this.request({ kind: "ping" }, { type: "ping" });
    return Date.now() - sentAt;
  }
  // ---- internals: connecting ------------------------------------------------------
  async startAttempt(freshToken) {
    if (freshToken && this.getToken) {
      const gen = this.generation;
      let token;
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
  connectUrl() {
    const u = new URL(this.baseUrl.href);
    u.searchParams.delete("last_seq");
    u.searchParams.delete("epoch");
    if (this.urlProject !== void 0) {
      const pos = this.positions.get(this.urlProject);
      if (pos?.seq !== void 0) {
        u.searchParams.set("last_seq", String(pos.seq));
        if (pos.epoch !== void 0) u.searchParams.set("epoch", pos.epoch);
      }
    }
    if (!this.urlHasCredentials && this.token !== void 0) {
      u.searchParams.set("token", this.token);
    }
    return u.href;
  }
  openSocket() {
    const url = this.connectUrl();
    const Ctor = this.WS;
    this._state = "connecting";
    this.closedFrame = void 0;
    let ws;
    try {
      ws = new Ctor(url);
    } catch (err) {
      this.emit("clientError", err);
      this.scheduleReconnect(CloseCode.ABNORMAL);
      return;
    }
    this.ws = ws;
    try {
      ws.binaryType = "arraybuffer";
    } catch {
    }
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.armLiveness();
      this.emit("open", { url });
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.armLiveness();
      this.handleData(ev?.data);
    };
    ws.onerror = () => {
      if (this.ws !== ws) return;
      this.detach();
      try {
        ws.close();
      } catch {
      }
      this.onClosed(CloseCode.ABNORMAL, "socket error", false);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.detach();
      const code = typeof ev?.code === "number" ? ev.code : CloseCode.ABNORMAL;
      const reason = typeof ev?.reason === "string" ? ev.reason : "";
      this.onClosed(code, reason, ev?.wasClean === true);
    };
    this.armLiveness();
  }
  /** Forgets the current socket: no more events from it. */
  detach() {
    const ws = this.ws;
    this.ws = null;
    this.established = void 0;
    this.clearLiveness();
    if (ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = null;
    }
  }
  /** Stops everything (timers, socket, async steps) without emitting. */
  halt() {
    this.generation += 1;
    this._state = "stopped";
    if (this.reconnectTimer !== void 0) {
      this.timers.clearTimeout(this.reconnectTimer);
      this.reconnectTimer = void 0;
    }
    this.detach();
  }
  onClosed(rawCode, reason, wasClean) {
    let code = rawCode;
    if ((code === CloseCode.ABNORMAL || code === CloseCode.NO_STATUS) && this.closedFrame) {
      code = this.closedFrame.code;
      reason = reason || this.closedFrame.reason;
    }
    this.closedFrame = void 0;
    this.failPending("disconnected", `connection closed (${code})`, code);
    this.emit("close", { code, reason, wasClean });
    if (this._state === "stopped") return;
    const action = closeAction(code, this.getToken !== void 0);
    if (action.kind === "stop") {
      this.halt();
      this.emit("stopped", { reason: action.reason, code });
      return;
    }
    this.scheduleReconnect(code);
  }
  /** Full-jitter exponential backoff, or the server's `reconnect_after_ms`. */
  scheduleReconnect(code) {
    let delay;
    if (this.nextDelayOverride !== void 0) {
      delay = this.nextDelayOverride;
      this.nextDelayOverride = void 0;
    } else {
      const cap = Math.min(this.maxMs, this.initialMs * 2 ** this.attempt);
      delay = Math.floor(this.random() * cap);
    }
    const attempt = this.attempt;
    this.attempt += 1;
    this._state = "reconnecting";
    const gen = this.generation;
    this.reconnectTimer = this.timers.setTimeout(() => {
      this.reconnectTimer = void 0;
      if (gen !== this.generation || this._state !== "reconnecting") return;
      this._state = "connecting";
      void this.startAttempt(this.getToken !== void 0);
    }, delay);
    this.emit("reconnecting", { delay, attempt, code });
  }
  // ---- internals: liveness ---------------------------------------------------------
  armLiveness() {
    this.clearLiveness();
    this.livenessTimer = this.timers.setTimeout(() => this.onLivenessTimeout(), this.heartbeatMs * 2.5);
  }
  clearLiveness() {
    if (this.livenessTimer !== void 0) {
      this.timers.clearTimeout(this.livenessTimer);
      this.livenessTimer = void 0;
    }
  }
  onLivenessTimeout() {
    this.livenessTimer = void 0;
    const ws = this.ws;
    if (!ws) return;
    this.detach();
    try {
      ws.close(CloseCode.LIVENESS_TIMEOUT, "liveness timeout");
    } catch {
    }
    this.onClosed(CloseCode.LIVENESS_TIMEOUT, "liveness timeout", false);
  }
  // ---- internals: incoming ---------------------------------------------------------
  handleData(data) {
    let text;
    if (typeof data === "string") {
      text = data;
    } else if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) {
      try {
        text = new TextDecoder().decode(data);
      } catch {
        return;
      }
    } else {
      return;
    }
    if (text === "pong") return;
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch {
      return;
    }
    if (!isRecord(parsed) || typeof parsed["type"] !== "string") return;
    try {
      this.handleMessage(parsed);
    } catch (err) {
      this.emit("clientError", err);
    }
  }
  handleMessage(msg) {
    const type = msg.type;
    const loose = msg;
    const project = typeof msg.project_id === "string" ? msg.project_id : this.urlProject;
    let resync;
    switch (type) {
      case "connection.established":
        this.onEstablished(msg);
        break;
      case "connection.resync_required": {
        resync = msg;
        if (project !== void 0) {
          const epoch = typeof resync.epoch === "string" ? resync.epoch : void 0;
          this.positions.set(project, epoch !== void 0 ? { epoch } : {});
        }
        break;
      }
      case "connection.closed": {
        const c = msg;
        if (typeof c.code === "number") {
          this.closedFrame = { code: c.code, reason: typeof c.reason === "string" ? c.reason : "" };
        }
        break;
      }
      case "container.reconnect": {
        const ms = msg.reconnect_after_ms;
        if (typeof ms === "number" && Number.isFinite(ms) && ms >= 0) this.nextDelayOverride = ms;
        break;
      }
      case "status": {
        if (project !== void 0 && typeof msg.seq === "number") {
          const epoch = loose["epoch"];
          let pos = this.positions.get(project);
          if (!pos) {
            pos = {};
            this.positions.set(project, pos);
          }
          if (pos.seq === void 0) pos.seq = msg.seq;
          if (pos.epoch === void 0 && typeof epoch === "string") pos.epoch = epoch;
        }
        break;
      }
      case "subscribed": {
        const p = msg.project_id;
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
          if (pos.seq !== void 0 && msg.seq <= pos.seq) return;
          pos.seq = msg.seq;
        }
    }
    this.settleReply(msg);
    const set = this.messageListeners.get(type);
    if (set) for (const fn of [...set]) this.call(fn, msg);
    for (const fn of [...this.anyListeners]) this.call(fn, msg);
    if (resync) this.emit("resync", resync);
  }
  onEstablished(msg) {
    this._state = "connected";
    this.established = msg;
    this.attempt = 0;
    this.nextDelayOverride = void 0;
    const hb = msg.heartbeat_interval;
    this.heartbeatMs = (typeof hb === "number" && hb > 0 ? hb : 30) * 1e3;
    this.armLiveness();
    const project = typeof msg.project_id === "string" ? msg.project_id : this.urlProject;
    if (project !== void 0) {
      this.adoptPosition(project, msg.seq, msg.epoch, msg.resumed === true);
    }
    const positions = msg["positions"];
    if (isRecord(positions)) {
      for (const [p, v] of Object.entries(positions)) {
        if (isRecord(v)) this.adoptPosition(p, v["seq"], v["epoch"], msg.resumed === true);
      }
    }
    for (const p of this.extraProjects) {
      this.request({ kind: "subscribe", projectId: p }, { type: "subscribe", project_id: p }).catch(
        (err) => {
          if (err instanceof SwitchboardError && err.code === "forbidden") this.extraProjects.delete(p);
          this.emit("clientError", err);
        }
      );
    }
  }
  /** Position announced by `connection.established`: kept when the server resumes (the
   * replay after last_seq follows), otherwise the project's current position. */
  adoptPosition(project, seq, epoch, resumed) {
    if (typeof epoch !== "string") return;
    const pos = this.positions.get(project);
    if (resumed && pos?.seq !== void 0) {
      pos.epoch = epoch;
      return;
    }
    const fresh = { epoch };
    if (typeof seq === "number") fresh.seq = seq;
    this.positions.set(project, fresh);
  }
  // ---- internals: requests ---------------------------------------------------------
  request(what, frame, timeoutMs = this.commandTimeoutMs) {
    const ws = this.ws;
    if (this._state !== "connected" || !ws) {
      return Promise.reject(
        new SwitchboardError("not_connected", "not connected", what.requestId !== void 0 ? { requestId: what.requestId } : {})
      );
    }
    return new Promise((resolve, reject) => {
      const p = {
        kind: what.kind,
        settled: false,
        timer: void 0,
        resolve,
        reject
      };
      if (what.requestId !== void 0) p.requestId = what.requestId;
      if (what.projectId !== void 0) p.projectId = what.projectId;
      p.timer = this.timers.setTimeout(() => {
        p.timer = void 0;
        if (p.settled) return;
        p.settled = true;
        p.reject(
          new SwitchboardError("timeout", `no answer within ${timeoutMs} ms`, requestExtra(p))
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
  settleReply(msg) {
    if (this.outstanding.length === 0) return;
    const loose = msg;
    let idx = -1;
    switch (msg.type) {
      case "command.accepted": {
        const rid = msg.request_id;
        idx = this.outstanding.findIndex((p2) => p2.kind === "command" && p2.requestId === rid);
        break;
      }
      case "error": {
        const rid = msg.request_id;
        idx = typeof rid === "string" ? this.outstanding.findIndex((p2) => p2.requestId === rid) : 0;
        break;
      }
      case "subscribed":
      case "unsubscribed": {
        const kind = msg.type === "subscribed" ? "subscribe" : "unsubscribe";
        const pid = loose["project_id"];
        idx = this.outstanding.findIndex((p2) => p2.kind === kind && p2.projectId === pid);
        break;
      }
      case "auth.refreshed":
        idx = this.outstanding.findIndex((p2) => p2.kind === "auth");
        break;
      case "status":
        idx = this.outstanding[0]?.kind === "status" ? 0 : -1;
        break;
      case "pong":
        idx = this.outstanding.findIndex((p2) => p2.kind === "ping");
        break;
      default:
        return;
    }
    if (idx < 0) return;
    const [p] = this.outstanding.splice(idx, 1);
    if (!p || p.settled) return;
    this.finish(p);
    if (msg.type === "error") {
      const e = msg;
      const extra = { frame: e };
      if (typeof e.field === "string") extra.field = e.field;
      const rid = typeof e.request_id === "string" ? e.request_id : p.requestId;
      if (rid !== void 0) extra.requestId = rid;
      p.reject(
        new SwitchboardError(
          typeof e.code === "string" ? e.code : "error",
          typeof e.message === "string" ? e.message : "server error",
          extra
        )
      );
    } else {
      p.resolve(msg);
    }
  }
  finish(p) {
    p.settled = true;
    if (p.timer !== void 0) {
      this.timers.clearTimeout(p.timer);
      p.timer = void 0;
    }
  }
  failPending(code, message, closeCode) {
    const pending = this.outstanding;
    this.outstanding = [];
    for (const p of pending) {
      if (p.settled) continue;
      this.finish(p);
      p.reject(new SwitchboardError(code, message, { ...requestExtra(p), closeCode }));
    }
  }
  // ---- internals: emitting ---------------------------------------------------------
  emit(event, payload) {
    const set = this.lifecycleListeners.get(event);
    if (!set || set.size === 0) {
      if (event === "clientError") {
        globalThis.console?.error?.(
          "[switchboard]",
          payload
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
  call(fn, msg) {
    try {
      fn(msg);
    } catch (err) {
      this.emit("clientError", err);
    }
  }
};
function isLifecycle(name) {
  return name === "open" || name === "close" || name === "reconnecting" || name === "resync" || name === "stopped" || name === "clientError";
}
function requestExtra(p) {
  return p.requestId !== void 0 ? { requestId: p.requestId } : {};
}

// clients/typescript/src/story.ts
var STATUSES = ["analyzing", "generating", "synthesizing", "complete", "failed"];
function isStoryProgress(v) {
  if (typeof v !== "object" || v === null || Array.isArray(v)) return false;
  const o = v;
  return typeof o.status === "string" && STATUSES.includes(o.status) && typeof o.progress_percent === "number" && o.progress_percent >= 0 && o.progress_percent <= 100;
}
var StoryProgressSocket = class {
  opts;
  WS;
  timers;
  random;
  ws = null;
  attempt = 0;
  stopped = false;
  retry = null;
  constructor(opts) {
    this.opts = opts;
    const WS = opts.WebSocket ?? globalThis.WebSocket;
    if (!WS) throw new Error("No WebSocket implementation: pass options.WebSocket");
    this.WS = WS;
    this.timers = opts.timers ?? {
      setTimeout: (f, ms) => setTimeout(f, ms),
      clearTimeout: (h) => clearTimeout(h)
    };
    this.random = opts.random ?? Math.random;
  }
  /** The socket URL: `/ws/stories/{id}/progress?token=` or `/ws/user/stories?token=`. */
  get socketUrl() {
    const base = this.opts.url.replace(/\/+$/, "");
    const path = this.opts.storyId === null ? "/ws/user/stories" : `/ws/stories/${encodeURIComponent(this.opts.storyId)}/progress`;
    return `${base}${path}?token=${encodeURIComponent(this.opts.token)}`;
  }
  connect() {
    if (this.stopped || this.ws) return;
    const ws = new this.WS(this.socketUrl);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string" || ev.data === "ping" || ev.data === "pong") return;
      let parsed;
      try {
        parsed = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (isStoryProgress(parsed)) this.opts.onProgress(parsed);
    };
    ws.onclose = (ev) => {
      this.ws = null;
      if (this.stopped) return;
      if (ev.code === 4001 || ev.code === 4003) {
        this.stop(ev.code, ev.reason);
        return;
      }
      const initial = this.opts.backoff?.initialMs ?? 500;
      const max = this.opts.backoff?.maxMs ?? 3e4;
      const delay = Math.floor(this.random() * Math.min(max, initial * 2 ** this.attempt));
      this.attempt += 1;
      this.retry = this.timers.setTimeout(() => {
        this.retry = null;
        this.connect();
      }, delay);
    };
  }
  /** Asks for the current progress again (the text `status`). False when not open. */
  requestStatus() {
    return this.sendText("status");
  }
  /** The seed's text `ping`; the gateway answers `pong`. False when not open. */
  ping() {
    return this.sendText("ping");
  }
  /** Closes for good. */
  close() {
    this.stop(1e3, "closed by the client");
  }
  sendText(text) {
    try {
      this.ws?.send(text);
      return this.ws !== null;
    } catch {
      return false;
    }
  }
  stop(code, reason) {
    if (this.stopped) return;
    this.stopped = true;
    if (this.retry !== null) this.timers.clearTimeout(this.retry);
    this.ws?.close(1e3);
    this.ws = null;
    this.opts.onStop?.({ code, reason });
  }
};
export {
  CloseCode,
  StoryProgressSocket,
  SwitchboardClient,
  SwitchboardError,
  closeAction,
  isStoryProgress
};
