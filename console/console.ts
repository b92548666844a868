// The event console's program (bundled into console/console.js by
// clients/typescript/scripts/bundle.mjs; the client is imported from the separately served
// console/switchboard-client.js). Connects to one project with @switchboard/client, lists
// every frame live (filter, pause, details) and sends commands. Its second view watches one
// story's progress (docs/protocol.md §9) with the client's StoryProgressSocket.
//
// Security: event data reaches the DOM only as text (textContent, createTextNode); the
// page's CSP (require-trusted-types-for) would refuse any HTML string anyway. The token
// lives in memory, and in sessionStorage only when the user ticks "Keep for this tab"; it
// is never put in the page's URL. Gateway URL and project (not secrets) are remembered in
// localStorage for convenience.

import {
  StoryProgressSocket,
  SwitchboardClient,
  SwitchboardError,
  type CommandAccepted,
  type ConnectionEstablished,
  type LifecycleEvents,
  type ServerMessage,
  type StopReason,
  type StoryProgress,
  type WebSocketConstructor,
} from "../clients/typescript/src/index.js";

// ---- limits ---------------------------------------------------------------------------

/** Rows kept in the list; older ones are dropped (a busy project must not grow the tab). */
const MAX_ROWS = 2000;
/** Rows held while paused; beyond, the oldest held ones are dropped and counted. */
const MAX_BUFFERED = 5000;

const STORE = {
  gateway: "switchboard.console.gateway",
  project: "switchboard.console.project",
  story: "switchboard.console.story",
  mode: "switchboard.console.mode",
  token: "switchboard.console.token", // sessionStorage, opt-in only
} as const;

const PROJECT_ID = /^[A-Za-z0-9_.-]{1,128}$/;
/** A story id follows the project-id rule (docs/protocol.md §9). */
const STORY_ID = PROJECT_ID;

// ---- elements -------------------------------------------------------------------------

function el<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`console: #${id} is missing from index.html`);
  return found as T;
}

const ui = {
  status: el<HTMLDivElement>("status"),
  connInfo: el<HTMLDivElement>("conn-info"),
  connectForm: el<HTMLFormElement>("connect-form"),
  gateway: el<HTMLInputElement>("gateway"),
  project: el<HTMLInputElement>("project"),
  token: el<HTMLInputElement>("token"),
  remember: el<HTMLInputElement>("remember"),
  connect: el<HTMLButtonElement>("connect"),
  formError: el<HTMLParagraphElement>("form-error"),
  filter: el<HTMLInputElement>("filter"),
  seenTypes: el<HTMLDataListElement>("seen-types"),
  count: el<HTMLSpanElement>("count"),
  pause: el<HTMLButtonElement>("pause"),
  clear: el<HTMLButtonElement>("clear"),
  tableWrap: el<HTMLDivElement>("table-wrap"),
  rows: el<HTMLTableSectionElement>("event-rows"),
  empty: el<HTMLParagraphElement>("empty"),
  detailsTitle: el<HTMLHeadingElement>("details-title"),
  details: el<HTMLPreElement>("details"),
  copy: el<HTMLButtonElement>("copy"),
  commandForm: el<HTMLFormElement>("command-form"),
  commandType: el<HTMLSelectElement>("command-type"),
  nodeId: el<HTMLInputElement>("node-id"),
  taskId: el<HTMLInputElement>("task-id"),
  parameters: el<HTMLTextAreaElement>("parameters"),
  send: el<HTMLButtonElement>("send"),
  commandResult: el<HTMLDivElement>("command-result"),
  commandOutcome: el<HTMLParagraphElement>("command-outcome"),
  commandReply: el<HTMLPreElement>("command-reply"),
  modeProject: el<HTMLButtonElement>("mode-project"),
  modeStory: el<HTMLButtonElement>("mode-story"),
  storyId: el<HTMLInputElement>("story-id"),
  projectView: el<HTMLElement>("project-view"),
  storyView: el<HTMLElement>("story-view"),
  storyTitle: el<HTMLHeadingElement>("story-title"),
  storyStatus: el<HTMLSpanElement>("story-status"),
  storyPercent: el<HTMLSpanElement>("story-percent"),
  storyBar: el<HTMLProgressElement>("story-bar"),
  storyStep: el<HTMLElement>("story-step"),
  storyUpdated: el<HTMLElement>("story-updated"),
  storyReceived: el<HTMLElement>("story-received"),
  storyRefresh: el<HTMLButtonElement>("story-refresh"),
  storyClear: el<HTMLButtonElement>("story-clear"),
  storyRows: el<HTMLTableSectionElement>("story-rows"),
  storyEmpty: el<HTMLParagraphElement>("story-empty"),
  storyJson: el<HTMLPreElement>("story-json"),
};

// ---- rows -----------------------------------------------------------------------------

interface Row {
  id: number;
  /** When the frame arrived here. */
  received: Date;
  type: string;
  seq: number | undefined;
  summary: string;
  /** The frame itself, or the client's lifecycle payload for local rows. */
  data: unknown;
  /** A lifecycle event of the client (open, close, reconnecting...), not a server frame. */
  local: boolean;
}

const rows: Row[] = [];
const held: Row[] = [];
let nextId = 1;
let dropped = 0;
let paused = false;
let selected: Row | undefined;
let filterTerms: { include: string[]; exclude: string[] } = { include: [], exclude: [] };
const typeCounts = new Map<string, number>();

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function short(id: unknown): string {
  return typeof id === "string" ? id.slice(0, 8) : "?";
}

function scalar(v: unknown): string {
  if (typeof v === "string") return v.length > 60 ? `${v.slice(0, 57)}…` : v;
  return String(v);
}

/** The client's own lifecycle rows, in words. */
function summarizeLocal(type: string, d: Record<string, unknown>): string {
  switch (type) {
    case "client.open":
      return `socket open · ${scalar(d["url"])}`;
    case "client.close":
      return `closed ${scalar(d["code"])}${d["reason"] ? ` (${scalar(d["reason"])})` : ""}`;
    case "client.reconnecting": {
      const attempt = typeof d["attempt"] === "number" ? d["attempt"] + 1 : "?";
      const delay = typeof d["delay"] === "number" ? (d["delay"] / 1000).toFixed(1) : "?";
      return `attempt ${attempt} in ${delay} s · after close ${scalar(d["code"])}`;
    }
    case "client.stopped":
      return `stopped: ${scalar(d["reason"])} (${scalar(d["code"])})`;
    case "client.resync":
      return `history no longer covers seq ${scalar(d["from_seq"])}: a fresh status follows`;
    default:
      return isRecord(d) && "message" in d ? scalar(d["message"]) : "";
  }
}

/** One line that tells events of the same type apart. */
function summarize(type: string, data: unknown): string {
  if (!isRecord(data)) return "";
  if (type.startsWith("client.")) return summarizeLocal(type, data);
  switch (type) {
    case "connection.established": {
      const e = data as unknown as ConnectionEstablished;
      return `client ${short(e.client_id)} · instance ${e.instance_id} · seq ${e.seq ?? "–"} · ${
        e.resumed ? "resumed" : "fresh"
      }`;
    }
    case "status": {
      const nodes = isRecord(data["nodes"]) ? Object.keys(data["nodes"]).length : 0;
      const tasks = isRecord(data["tasks"]) ? Object.keys(data["tasks"]).length : 0;
      return `snapshot: ${nodes} node${nodes === 1 ? "" : "s"}, ${tasks} task${tasks === 1 ? "" : "s"}, seq ${
        data["seq"] ?? "–"
      }`;
    }
    case "error":
      return `${scalar(data["code"])}: ${scalar(data["message"])}`;
  }
  const parts: string[] = [];
  for (const [key, value] of Object.entries(data)) {
    if (key === "type" || key === "timestamp" || key === "project_id" || key === "seq") continue;
    if (value === null || value === undefined) continue;
    if (isRecord(value)) {
      // The seed's progress object: its percentage is what a reader scans for.
      if (typeof value["percentage"] === "number") parts.push(`${key} ${value["percentage"]}%`);
      continue;
    }
    if (Array.isArray(value)) {
      parts.push(`${key} [${value.length}]`);
      continue;
    }
    parts.push(`${key} ${scalar(value)}`);
    if (parts.length >= 5) break;
  }
  return parts.join(" · ");
}

/** Colour family of a type (see console.css `.chip.cat-*`). */
function category(type: string, local: boolean): string {
  if (local) return "client";
  const head = type.split(".")[0] ?? "";
  switch (head) {
    case "node":
    case "task":
    case "agent":
    case "file":
    case "character":
      return head;
    case "workspace":
      return "file";
    case "take":
    case "runner":
    case "project":
      return "misc";
    case "connection":
    case "system":
    case "container":
      return "conn";
    case "error":
      return "error";
    default:
      return "reply";
  }
}

function two(n: number): string {
  return String(n).padStart(2, "0");
}

function clock(d: Date): string {
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

/** The event's own time when it has one (publish time), else when it arrived. */
function eventTime(row: Row): Date {
  if (isRecord(row.data) && typeof row.data["timestamp"] === "string") {
    const t = new Date(row.data["timestamp"]);
    if (!Number.isNaN(t.getTime())) return t;
  }
  return row.received;
}

function parseFilter(text: string): void {
  const terms = text.toLowerCase().split(/[\s,]+/).filter(Boolean);
  filterTerms = {
    include: terms.filter((t) => !t.startsWith("-")),
    exclude: terms.filter((t) => t.startsWith("-") && t.length > 1).map((t) => t.slice(1)),
  };
}

function matches(row: Row): boolean {
  const type = row.type.toLowerCase();
  if (filterTerms.exclude.some((t) => type.includes(t))) return false;
  return filterTerms.include.length === 0 || filterTerms.include.some((t) => type.includes(t));
}

function cell(text: string, cls: string): HTMLTableCellElement {
  const td = document.createElement("td");
  td.className = cls;
  td.textContent = text;
  return td;
}

function rowElement(row: Row): HTMLTableRowElement {
  const tr = document.createElement("tr");
  tr.dataset["id"] = String(row.id);
  tr.dataset["type"] = row.type;
  if (row.seq !== undefined) tr.dataset["seq"] = String(row.seq);
  if (row.local) tr.classList.add("local");
  if (selected === row) tr.setAttribute("aria-selected", "true");
  const when = eventTime(row);
  const time = cell(clock(when), "c-time");
  time.title = when.toISOString();
  const typeCell = document.createElement("td");
  typeCell.className = "c-type";
  const chip = document.createElement("span");
  chip.className = `chip cat-${category(row.type, row.local)}`;
  chip.textContent = row.type;
  typeCell.append(chip);
  const summary = cell(row.summary, "c-summary");
  summary.title = row.summary;
  tr.append(time, cell(row.seq === undefined ? "" : String(row.seq), "c-seq"), typeCell, summary);
  return tr;
}

function renderCount(): void {
  const shown = ui.rows.childElementCount;
  let text = shown === rows.length ? `${rows.length} events` : `${shown} of ${rows.length} events`;
  if (dropped > 0) text += ` · ${dropped} oldest dropped`;
  ui.count.textContent = text;
  ui.empty.hidden = rows.length > 0;
}

function renderPause(): void {
  ui.pause.textContent = paused ? `Resume (${held.length} new)` : "Pause";
  ui.pause.setAttribute("aria-pressed", String(paused));
  ui.pause.classList.toggle("active", paused);
}

/** Full redraw (filter change, clear): newest first. */
function renderAll(): void {
  const frag = document.createDocumentFragment();
  for (let i = rows.length - 1; i >= 0; i -= 1) {
    const row = rows[i] as Row;
    if (matches(row)) frag.append(rowElement(row));
  }
  ui.rows.replaceChildren(frag);
  renderCount();
}

function noteType(type: string): void {
  const n = typeCounts.get(type);
  typeCounts.set(type, (n ?? 0) + 1);
  if (n === undefined) {
    const opt = document.createElement("option");
    opt.value = type;
    ui.seenTypes.append(opt);
  }
}

function show(row: Row): void {
  rows.push(row);
  noteType(row.type);
  if (matches(row)) ui.rows.prepend(rowElement(row));
  while (rows.length > MAX_ROWS) {
    const old = rows.shift() as Row;
    dropped += 1;
    ui.rows.querySelector(`tr[data-id="${old.id}"]`)?.remove();
  }
}

function addRow(row: Row): void {
  if (paused) {
    held.push(row);
    if (held.length > MAX_BUFFERED) {
      held.shift();
      dropped += 1;
    }
    renderPause();
    return;
  }
  show(row);
  renderCount();
}

/** Frames whose `seq` is the project's position (shown in their summary), not their own. */
const POSITION_FRAMES = new Set(["connection.established", "status", "system.heartbeat", "pong"]);

function makeRow(type: string, data: unknown, local: boolean): Row {
  const seq =
    !local && !POSITION_FRAMES.has(type) && isRecord(data) && typeof data["seq"] === "number"
      ? data["seq"]
      : undefined;
  return { id: nextId++, received: new Date(), type, seq, summary: summarize(type, data), data, local };
}

function setPaused(on: boolean): void {
  paused = on;
  if (!on) {
    for (const row of held.splice(0)) show(row);
    renderCount();
  }
  renderPause();
}

// ---- details --------------------------------------------------------------------------

function token(cls: string, text: string): HTMLSpanElement {
  const span = document.createElement("span");
  span.className = cls;
  span.textContent = text;
  return span;
}

/** Pretty JSON as text nodes and coloured spans (never through an HTML string). */
function appendJson(out: Node[], value: unknown, indent: string): void {
  if (value === null || value === undefined) {
    out.push(token("j-null", "null"));
  } else if (typeof value === "string") {
    out.push(token("j-str", JSON.stringify(value)));
  } else if (typeof value === "number") {
    out.push(token("j-num", String(value)));
  } else if (typeof value === "boolean") {
    out.push(token("j-bool", String(value)));
  } else if (Array.isArray(value)) {
    if (value.length === 0) {
      out.push(document.createTextNode("[]"));
      return;
    }
    const inner = `${indent}  `;
    out.push(document.createTextNode("[\n"));
    value.forEach((item, i) => {
      out.push(document.createTextNode(inner));
      appendJson(out, item, inner);
      out.push(document.createTextNode(i < value.length - 1 ? ",\n" : "\n"));
    });
    out.push(document.createTextNode(`${indent}]`));
  } else if (isRecord(value)) {
    const entries = Object.entries(value);
    if (entries.length === 0) {
      out.push(document.createTextNode("{}"));
      return;
    }
    const inner = `${indent}  `;
    out.push(document.createTextNode("{\n"));
    entries.forEach(([k, v], i) => {
      out.push(document.createTextNode(inner), token("j-key", JSON.stringify(k)), document.createTextNode(": "));
      appendJson(out, v, inner);
      out.push(document.createTextNode(i < entries.length - 1 ? ",\n" : "\n"));
    });
    out.push(document.createTextNode(`${indent}}`));
  } else {
    out.push(document.createTextNode(String(value)));
  }
}

function renderJson(target: HTMLElement, value: unknown): void {
  const out: Node[] = [];
  appendJson(out, value, "");
  target.replaceChildren(...out);
}

function select(row: Row | undefined): void {
  selected = row;
  for (const tr of ui.rows.querySelectorAll('tr[aria-selected="true"]')) tr.removeAttribute("aria-selected");
  if (!row) {
    ui.detailsTitle.textContent = "Event details";
    ui.details.classList.add("placeholder");
    ui.details.textContent = "Select an event to see it in full.";
    ui.copy.disabled = true;
    return;
  }
  ui.rows.querySelector(`tr[data-id="${row.id}"]`)?.setAttribute("aria-selected", "true");
  ui.detailsTitle.textContent = row.seq === undefined ? row.type : `${row.type} · seq ${row.seq}`;
  ui.details.classList.remove("placeholder");
  renderJson(ui.details, row.data);
  ui.copy.disabled = false;
}

function rowOf(target: EventTarget | null): Row | undefined {
  const tr = target instanceof Element ? target.closest("tr[data-id]") : null;
  if (!(tr instanceof HTMLElement)) return undefined;
  const id = Number(tr.dataset["id"]);
  return rows.find((r) => r.id === id);
}

// ---- connection -----------------------------------------------------------------------

type BadgeState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

let client: SwitchboardClient | undefined;
let reconnects = 0;
let established: ConnectionEstablished | undefined;

function setStatus(state: BadgeState, text: string, detail = ""): void {
  ui.status.dataset["state"] = state;
  ui.status.textContent = text;
  ui.status.title = detail;
  const active = state === "connecting" || state === "open" || state === "reconnecting";
  ui.connect.textContent = active ? "Disconnect" : "Connect";
  ui.connect.classList.toggle("primary", !active);
  for (const input of [ui.gateway, ui.project, ui.storyId, ui.token]) input.disabled = active;
  // One connection at a time: the view is switched while disconnected.
  for (const button of [ui.modeProject, ui.modeStory]) {
    button.disabled = active;
    button.title = active ? "Disconnect to switch the view" : "";
  }
  ui.send.disabled = state !== "open" || mode !== "project";
  ui.storyRefresh.disabled = state !== "open" || mode !== "story";
  renderConnInfo();
}

function renderConnInfo(): void {
  const parts: string[] = [];
  if (mode === "story") {
    if (story && ui.status.dataset["state"] === "open") parts.push(`story ${storyId}`);
  } else if (established && ui.status.dataset["state"] === "open") {
    parts.push(`project ${established.project_id ?? ui.project.value}`);
    parts.push(`instance ${established.instance_id}`);
    parts.push(`client ${short(established.client_id)}`);
  }
  if (reconnects > 0) parts.push(`${reconnects} reconnect${reconnects === 1 ? "" : "s"}`);
  ui.connInfo.textContent = parts.join(" · ");
}

const STOP_TEXT: Record<StopReason, string> = {
  closed: "disconnected",
  unauthenticated: "the token is missing, invalid or expired",
  forbidden: "the token does not grant this project",
  credential_expired: "the token expired",
  rate_limited: "rate limited by the gateway",
  protocol_error: "the gateway refused a message",
};

function formError(message: string | undefined): void {
  ui.formError.hidden = message === undefined;
  ui.formError.textContent = message ?? "";
}

/** `http(s)://host[:port][/path]` or `ws(s)://…` → `ws(s)://host[:port][/path]`. */
function socketBase(gateway: string): string {
  const base = new URL(gateway, location.href);
  if (!["http:", "https:", "ws:", "wss:"].includes(base.protocol)) {
    throw new Error("the gateway URL must start with http://, https://, ws:// or wss://");
  }
  const path = base.pathname.replace(/\/+$/, "");
  return `${base.origin.replace(/^http/, "ws")}${path}`;
}

/** `http(s)://host[:port]` or `ws(s)://…` → the project's WebSocket URL. */
function projectUrl(gateway: string, project: string): string {
  return `${socketBase(gateway)}/ws/${encodeURIComponent(project)}`;
}

/** Remembers the gateway and the project or story (`what`), and the token if asked to. */
function storeSettings(gateway: string, what: [key: string, value: string], tokenValue: string): void {
  try {
    localStorage.setItem(STORE.gateway, gateway);
    localStorage.setItem(what[0], what[1]);
    if (ui.remember.checked) sessionStorage.setItem(STORE.token, tokenValue);
    else sessionStorage.removeItem(STORE.token);
  } catch {
    /* storage disabled: everything still works from memory */
  }
}

function connect(): void {
  const gateway = ui.gateway.value.trim() || location.origin;
  const project = ui.project.value.trim();
  const tokenValue = ui.token.value.trim();
  if (!PROJECT_ID.test(project) || project === "user") {
    formError("Project: 1 to 128 of A-Z a-z 0-9 _ . - (and not `user`).");
    ui.project.focus();
    return;
  }
  if (tokenValue === "") {
    formError("Token: paste a JWT that grants this project (e.g. from `switchboard token`).");
    ui.token.focus();
    return;
  }
  let url: string;
  try {
    url = projectUrl(gateway, project);
  } catch (err) {
    formError(`Gateway: ${err instanceof Error ? err.message : String(err)}`);
    ui.gateway.focus();
    return;
  }
  formError(undefined);
  storeSettings(gateway, [STORE.project, project], tokenValue);
  reconnects = 0;
  established = undefined;

  const c = new SwitchboardClient({ url, token: tokenValue, backoff: { initialMs: 500, maxMs: 10_000 } });
  client = c;
  c.onAny((msg: ServerMessage) => {
    if (client === c) addRow(makeRow(msg.type, msg, false));
  });
  c.on("connection.established", (e) => {
    if (client !== c) return;
    established = e;
    setStatus("open", "open", `connected to ${url.replace(/\?.*$/, "")}`);
  });
  const local = (name: keyof LifecycleEvents, payload: unknown) => {
    if (client === c) addRow(makeRow(`client.${name}`, payload, true));
  };
  c.on("open", (e) => {
    // The URL carries the token: only its path is shown.
    local("open", { url: e.url.replace(/\?.*$/, "") });
  });
  c.on("close", (e) => {
    local("close", e);
    if (client === c) established = undefined;
  });
  c.on("reconnecting", (e) => {
    if (client !== c) return;
    reconnects += 1;
    local("reconnecting", e);
    setStatus(
      "reconnecting",
      `reconnecting · attempt ${e.attempt + 1}`,
      `closed with ${e.code}; next try in ${(e.delay / 1000).toFixed(1)} s`,
    );
  });
  c.on("resync", (e) => local("resync", e));
  c.on("stopped", (e) => {
    if (client !== c) return;
    local("stopped", e);
    if (e.reason === "closed") setStatus("idle", "disconnected");
    else setStatus("closed", `closed · ${e.code}`, STOP_TEXT[e.reason]);
    if (e.reason !== "closed") formError(`Closed with ${e.code}: ${STOP_TEXT[e.reason]}.`);
  });
  c.on("clientError", (err) => {
    local("clientError", { message: err instanceof Error ? err.message : String(err) });
  });
  setStatus("connecting", "connecting");
  c.connect();
}

function disconnect(): void {
  const c = client;
  if (c) c.close();
  setStatus("idle", "disconnected");
}

// ---- commands -------------------------------------------------------------------------

/** The outcome line (what happened) and the reply frame or error under it. */
function showCommandResult(state: "ok" | "error" | "pending", outcome: string, reply?: unknown): void {
  ui.commandResult.dataset["state"] = state;
  ui.commandOutcome.textContent = outcome;
  if (reply === undefined) ui.commandReply.replaceChildren();
  else renderJson(ui.commandReply, reply);
}

function accepted(reply: CommandAccepted): void {
  const n = reply.delivered_to;
  showCommandResult("ok", `✓ ${reply.command} accepted · delivered to ${n} worker${n === 1 ? "" : "s"}`, reply);
}

function syncCommandFields(): void {
  const kind = ui.commandType.value;
  for (const field of ui.commandForm.querySelectorAll<HTMLElement>("[data-command]")) {
    field.hidden = field.dataset["command"] !== kind;
  }
}

async function sendCommand(): Promise<void> {
  const c = client;
  if (!c || c.state !== "connected") {
    showCommandResult("error", "✗ not connected");
    return;
  }
  try {
    if (ui.commandType.value === "task.cancel") {
      const taskId = ui.taskId.value.trim();
      if (!taskId) {
        showCommandResult("error", "✗ a task id is required");
        return;
      }
      showCommandResult("pending", `task.cancel ${taskId} …`);
      accepted(await c.cancelTask(taskId));
    } else {
      const nodeId = ui.nodeId.value.trim();
      if (!nodeId) {
        showCommandResult("error", "✗ a node id is required");
        return;
      }
      let parameters: unknown;
      try {
        parameters = JSON.parse(ui.parameters.value.trim() || "{}");
      } catch (err) {
        showCommandResult("error", `✗ parameters are not JSON: ${err instanceof Error ? err.message : String(err)}`);
        return;
      }
      if (!isRecord(parameters)) {
        showCommandResult("error", "✗ parameters must be a JSON object");
        return;
      }
      showCommandResult("pending", `node.execute ${nodeId} …`);
      accepted(await c.execute(nodeId, parameters));
    }
  } catch (err) {
    if (err instanceof SwitchboardError) {
      const shown: Record<string, unknown> = { error: err.code, message: err.message };
      if (err.field !== undefined) shown["field"] = err.field;
      if (err.requestId !== undefined) shown["request_id"] = err.requestId;
      showCommandResult("error", `✗ ${err.code}: ${err.message}`, shown);
    } else {
      showCommandResult("error", `✗ ${String(err)}`);
    }
  }
}

// ---- story progress -------------------------------------------------------------------

type Mode = "project" | "story";

let mode: Mode = "project";
let story: StoryProgressSocket | undefined;
/** The story being watched (shown in the header while open). */
let storyId = "";
/** Closes since the last open (the attempt number shown while reconnecting). */
let storyAttempt = 0;
let storyMessages = 0;

/** Closes that stop the story socket for good, in words (any other close reconnects). */
const STORY_STOP_TEXT: Record<number, string> = {
  4001: "the token is missing, invalid or expired",
  4003: "the token does not grant this story",
};

/** The browser's WebSocket, also telling the console when it opens and closes: the story
 * socket keeps its own handlers (and so its reconnect and backoff) and has no lifecycle
 * events to listen to. */
function observedWebSocket(onOpen: (url: string) => void, onClose: (code: number, reason: string) => void) {
  const Observed = class extends WebSocket {
    constructor(url: string) {
      super(url);
      this.addEventListener("open", () => onOpen(url));
      this.addEventListener("close", (ev) => onClose(ev.code, ev.reason));
    }
  };
  return Observed as WebSocketConstructor;
}

function percentText(p: number): string {
  return `${Number.isInteger(p) ? p : p.toFixed(1)}%`;
}

/** An ISO time as written, with the local time as its tooltip. */
function showTime(target: HTMLElement, iso: unknown): void {
  if (typeof iso !== "string" || iso === "") {
    target.textContent = "–";
    target.title = "";
    return;
  }
  target.textContent = iso;
  const t = new Date(iso);
  target.title = Number.isNaN(t.getTime()) ? "" : t.toLocaleString();
}

function renderStoryCount(): void {
  ui.storyReceived.textContent = `${storyMessages} message${storyMessages === 1 ? "" : "s"}`;
  ui.storyEmpty.hidden = ui.storyRows.childElementCount > 0;
}

/** The card before the first message of `id`. */
function resetStoryCard(id: string): void {
  ui.storyTitle.textContent = id === "" ? "No story" : `Story ${id}`;
  ui.storyStatus.dataset["status"] = "none";
  ui.storyStatus.textContent = "–";
  ui.storyPercent.textContent = "–";
  ui.storyBar.value = 0;
  ui.storyStep.textContent = "–";
  showTime(ui.storyUpdated, undefined);
  ui.storyJson.classList.add("placeholder");
  ui.storyJson.textContent = "The last progress message received appears here in full.";
  storyMessages = 0;
  renderStoryCount();
}

function addStoryRow(tr: HTMLTableRowElement): void {
  ui.storyRows.prepend(tr);
  while (ui.storyRows.childElementCount > MAX_ROWS) ui.storyRows.lastElementChild?.remove();
  renderStoryCount();
}

/** A step of the socket itself (open, close, reconnect, stop), in grey across the row. */
function addStoryLocal(text: string): void {
  const tr = document.createElement("tr");
  tr.className = "local";
  tr.dataset["type"] = "local";
  const now = new Date();
  const time = cell(clock(now), "c-time");
  time.title = now.toISOString();
  const what = cell(text, "c-summary");
  what.colSpan = 4;
  what.title = text;
  tr.append(time, what);
  addStoryRow(tr);
}

function showProgress(p: StoryProgress): void {
  storyMessages += 1;
  ui.storyStatus.dataset["status"] = p.status;
  ui.storyStatus.textContent = p.status;
  ui.storyPercent.textContent = percentText(p.progress_percent);
  ui.storyBar.value = p.progress_percent;
  ui.storyStep.textContent = typeof p.current_step === "string" && p.current_step !== "" ? p.current_step : "–";
  showTime(ui.storyUpdated, p.updated_at);
  ui.storyJson.classList.remove("placeholder");
  renderJson(ui.storyJson, p);

  const tr = document.createElement("tr");
  tr.dataset["type"] = "progress";
  tr.dataset["status"] = p.status;
  tr.dataset["percent"] = String(p.progress_percent);
  const now = new Date();
  const time = cell(clock(now), "c-time");
  time.title = now.toISOString();
  const statusCell = document.createElement("td");
  statusCell.className = "c-status";
  const chip = document.createElement("span");
  chip.className = "chip story-status";
  chip.dataset["status"] = p.status;
  chip.textContent = p.status;
  statusCell.append(chip);
  const step = cell(typeof p.current_step === "string" ? p.current_step : "", "c-summary");
  step.title = step.textContent ?? "";
  const updated = cell(typeof p.updated_at === "string" ? p.updated_at : "", "c-updated");
  tr.append(time, statusCell, cell(percentText(p.progress_percent), "c-pct"), step, updated);
  addStoryRow(tr);
}

function connectStory(): void {
  const gateway = ui.gateway.value.trim() || location.origin;
  const id = ui.storyId.value.trim();
  const tokenValue = ui.token.value.trim();
  if (!STORY_ID.test(id)) {
    formError("Story: 1 to 128 of A-Z a-z 0-9 _ . -");
    ui.storyId.focus();
    return;
  }
  if (tokenValue === "") {
    formError("Token: paste a JWT that grants this story (its `stories` claim names it).");
    ui.token.focus();
    return;
  }
  let base: string;
  try {
    base = socketBase(gateway);
  } catch (err) {
    formError(`Gateway: ${err instanceof Error ? err.message : String(err)}`);
    ui.gateway.focus();
    return;
  }
  formError(undefined);
  storeSettings(gateway, [STORE.story, id], tokenValue);
  storyId = id;
  storyAttempt = 0;
  reconnects = 0;
  resetStoryCard(id);
  addStoryLocal(`watching story ${id}`);

  const WS = observedWebSocket(
    (url) => {
      if (story !== s) return;
      storyAttempt = 0;
      // The URL carries the token: only its path is shown.
      addStoryLocal(`socket open · ${url.replace(/\?.*$/, "")}`);
      setStatus("open", "open", `watching ${url.replace(/\?.*$/, "")}`);
    },
    (code, reason) => {
      if (story !== s) return;
      addStoryLocal(`closed ${code}${reason ? ` (${reason})` : ""}`);
      // The socket decides in its own close handler, which runs after this one: it either
      // stops (onStop below, which forgets it) or schedules a reconnect.
      setTimeout(() => {
        if (story !== s) return;
        storyAttempt += 1;
        reconnects += 1;
        addStoryLocal(`reconnecting · attempt ${storyAttempt} · after close ${code}`);
        setStatus(
          "reconnecting",
          `reconnecting · attempt ${storyAttempt}`,
          `closed with ${code}${code === 1013 ? " (try again later)" : ""}; reconnecting with backoff`,
        );
      }, 0);
    },
  );
  const s: StoryProgressSocket = new StoryProgressSocket({
    url: base,
    storyId: id,
    token: tokenValue,
    WebSocket: WS,
    backoff: { initialMs: 500, maxMs: 10_000 },
    onProgress: (p) => {
      if (story === s) showProgress(p);
    },
    onStop: ({ code, reason }) => {
      if (story !== s) return;
      story = undefined;
      const why = STORY_STOP_TEXT[code] ?? "the gateway ended the connection";
      addStoryLocal(`stopped: ${code}${reason ? ` ${reason}` : ""}`);
      if (code === 1000) {
        setStatus("idle", "disconnected");
        return;
      }
      setStatus("closed", `closed · ${code}`, why);
      formError(`Closed with ${code}${reason ? ` (${reason})` : ""}: ${why}.`);
    },
  });
  story = s;
  setStatus("connecting", "connecting");
  s.connect();
}

function disconnectStory(): void {
  const s = story;
  story = undefined;
  if (s) {
    s.close();
    addStoryLocal("closed by you");
  }
  setStatus("idle", "disconnected");
}

function setMode(next: Mode): void {
  mode = next;
  ui.modeProject.setAttribute("aria-pressed", String(mode === "project"));
  ui.modeStory.setAttribute("aria-pressed", String(mode === "story"));
  const projectField = ui.project.closest("label");
  const storyField = ui.storyId.closest("label");
  if (projectField) projectField.hidden = mode !== "project";
  if (storyField) storyField.hidden = mode !== "story";
  ui.projectView.hidden = mode !== "project";
  ui.storyView.hidden = mode !== "story";
  try {
    localStorage.setItem(STORE.mode, mode);
  } catch {
    /* storage disabled */
  }
}

/** Switching happens while disconnected only (the buttons are disabled meanwhile). */
function switchMode(next: Mode): void {
  if (next === mode) return;
  setMode(next);
  formError(undefined);
  setStatus("idle", "disconnected");
}

// ---- wiring ---------------------------------------------------------------------------

function restoreSettings(): void {
  let gateway: string | null = null;
  let project: string | null = null;
  let storyValue: string | null = null;
  let modeValue: string | null = null;
  let tokenValue: string | null = null;
  try {
    gateway = localStorage.getItem(STORE.gateway);
    project = localStorage.getItem(STORE.project);
    storyValue = localStorage.getItem(STORE.story);
    modeValue = localStorage.getItem(STORE.mode);
    tokenValue = sessionStorage.getItem(STORE.token);
  } catch {
    /* storage disabled */
  }
  ui.gateway.value = gateway ?? location.origin;
  ui.project.value = project ?? "demo";
  ui.storyId.value = storyValue ?? "";
  setMode(modeValue === "story" ? "story" : "project");
  if (tokenValue !== null) {
    ui.token.value = tokenValue;
    ui.remember.checked = true;
  }
}

ui.connectForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (mode === "story") {
    if (story) disconnectStory();
    else connectStory();
    return;
  }
  if (client && client.state !== "stopped" && client.state !== "idle") disconnect();
  else connect();
});
ui.remember.addEventListener("change", () => {
  if (!ui.remember.checked) {
    try {
      sessionStorage.removeItem(STORE.token);
    } catch {
      /* storage disabled */
    }
  }
});
ui.filter.addEventListener("input", () => {
  parseFilter(ui.filter.value);
  renderAll();
});
ui.pause.addEventListener("click", () => setPaused(!paused));
ui.clear.addEventListener("click", () => {
  rows.length = 0;
  held.length = 0;
  dropped = 0;
  select(undefined);
  renderAll();
  renderPause();
});
ui.rows.addEventListener("click", (ev) => select(rowOf(ev.target)));
// One tab stop for the whole list (not one per row): arrow keys move the selection.
ui.tableWrap.addEventListener("keydown", (ev) => {
  if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
  ev.preventDefault();
  const current = selected ? ui.rows.querySelector(`tr[data-id="${selected.id}"]`) : null;
  const next = !current
    ? ui.rows.firstElementChild
    : ev.key === "ArrowDown"
      ? current.nextElementSibling
      : current.previousElementSibling;
  if (next instanceof HTMLElement) {
    select(rowOf(next));
    next.scrollIntoView({ block: "nearest" });
  }
});
function flashCopy(text: string): void {
  ui.copy.textContent = text;
  setTimeout(() => (ui.copy.textContent = "Copy JSON"), 1500);
}

ui.copy.addEventListener("click", () => {
  if (!selected) return;
  // The clipboard API exists in secure contexts only (https, localhost); elsewhere (a
  // gateway on http://host:8080) the JSON is selected for Ctrl+C instead.
  if (!navigator.clipboard) {
    getSelection()?.selectAllChildren(ui.details);
    flashCopy("Selected: Ctrl+C");
    return;
  }
  navigator.clipboard.writeText(JSON.stringify(selected.data, null, 2)).then(
    () => flashCopy("Copied"),
    () => flashCopy("Copy failed"),
  );
});
ui.commandType.addEventListener("change", syncCommandFields);
ui.modeProject.addEventListener("click", () => switchMode("project"));
ui.modeStory.addEventListener("click", () => switchMode("story"));
ui.storyRefresh.addEventListener("click", () => {
  if (story && !story.requestStatus()) addStoryLocal("not open: status not sent");
});
ui.storyClear.addEventListener("click", () => {
  ui.storyRows.replaceChildren();
  renderStoryCount();
});
ui.commandForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  void sendCommand();
});

restoreSettings();
syncCommandFields();
setStatus("idle", "disconnected");
renderAll();
renderPause();
renderStoryCount();
