// GENERATED from console/console.ts by clients/typescript/scripts/bundle.mjs. Do not edit:
// run `npm run bundle` in clients/typescript (the tests fail while this file is stale).

// console/console.ts
import {
  StoryProgressSocket,
  SwitchboardClient,
  SwitchboardError
} from "./switchboard-client.js";
var MAX_ROWS = 2e3;
var MAX_BUFFERED = 5e3;
var STORE = {
  gateway: "switchboard.console.gateway",
  project: "switchboard.console.project",
  story: "switchboard.console.story",
  mode: "switchboard.console.mode",
  token: "switchboard.console.token"
  // sessionStorage, opt-in only
};
var PROJECT_ID = /^[A-Za-z0-9_.-]{1,128}$/;
var STORY_ID = PROJECT_ID;
function el(id) {
  const found = document.getElementById(id);
  if (!found) throw new Error(`console: #${id} is missing from index.html`);
  return found;
}
var ui = {
  status: el("status"),
  connInfo: el("conn-info"),
  connectForm: el("connect-form"),
  gateway: el("gateway"),
  project: el("project"),
  token: el("token"),
  remember: el("remember"),
  connect: el("connect"),
  formError: el("form-error"),
  filter: el("filter"),
  seenTypes: el("seen-types"),
  count: el("count"),
  pause: el("pause"),
  clear: el("clear"),
  tableWrap: el("table-wrap"),
  rows: el("event-rows"),
  empty: el("empty"),
  detailsTitle: el("details-title"),
  details: el("details"),
  copy: el("copy"),
  commandForm: el("command-form"),
  commandType: el("command-type"),
  nodeId: el("node-id"),
  taskId: el("task-id"),
  parameters: el("parameters"),
  send: el("send"),
  commandResult: el("command-result"),
  commandOutcome: el("command-outcome"),
  commandReply: el("command-reply"),
  modeProject: el("mode-project"),
  modeStory: el("mode-story"),
  storyId: el("story-id"),
  projectView: el("project-view"),
  storyView: el("story-view"),
  storyTitle: el("story-title"),
  storyStatus: el("story-status"),
  storyPercent: el("story-percent"),
  storyBar: el("story-bar"),
  storyStep: el("story-step"),
  storyUpdated: el("story-updated"),
  storyReceived: el("story-received"),
  storyRefresh: el("story-refresh"),
  storyClear: el("story-clear"),
  storyRows: el("story-rows"),
  storyEmpty: el("story-empty"),
  storyJson: el("story-json")
};
var rows = [];
var held = [];
var nextId = 1;
var dropped = 0;
var paused = false;
var selected;
var filterTerms = { include: [], exclude: [] };
var typeCounts = /* @__PURE__ */ new Map();
function isRecord(v) {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
function short(id) {
  return typeof id === "string" ? id.slice(0, 8) : "?";
}
function scalar(v) {
  if (typeof v === "string") return v.length > 60 ? `${v.slice(0, 57)}…` : v;
  return String(v);
}
function summarizeLocal(type, d) {
  switch (type) {
    case "client.open":
      return `socket open · ${scalar(d["url"])}`;
    case "client.close":
      return `closed ${scalar(d["code"])}${d["reason"] ? ` (${scalar(d["reason"])})` : ""}`;
    case "client.reconnecting": {
      const attempt = typeof d["attempt"] === "number" ? d["attempt"] + 1 : "?";
      const delay = typeof d["delay"] === "number" ? (d["delay"] / 1e3).toFixed(1) : "?";
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
function summarize(type, data) {
  if (!isRecord(data)) return "";
  if (type.startsWith("client.")) return summarizeLocal(type, data);
  switch (type) {
    case "connection.established": {
      const e = data;
      return `client ${short(e.client_id)} · instance ${e.instance_id} · seq ${e.seq ?? "–"} · ${e.resumed ? "resumed" : "fresh"}`;
    }
    case "status": {
      const nodes = isRecord(data["nodes"]) ? Object.keys(data["nodes"]).length : 0;
      const tasks = isRecord(data["tasks"]) ? Object.keys(data["tasks"]).length : 0;
      return `snapshot: ${nodes} node${nodes === 1 ? "" : "s"}, ${tasks} task${tasks === 1 ? "" : "s"}, seq ${data["seq"] ?? "–"}`;
    }
    case "error":
      return `${scalar(data["code"])}: ${scalar(data["message"])}`;
  }
  const parts = [];
  for (const [key, value] of Object.entries(data)) {
    if (key === "type" || key === "timestamp" || key === "project_id" || key === "seq") continue;
    if (value === null || value === void 0) continue;
    if (isRecord(value)) {
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
function category(type, local) {
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
function two(n) {
  return String(n).padStart(2, "0");
}
function clock(d) {
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}
function eventTime(row) {
  if (isRecord(row.data) && typeof row.data["timestamp"] === "string") {
    const t = new Date(row.data["timestamp"]);
    if (!Number.isNaN(t.getTime())) return t;
  }
  return row.received;
}
function parseFilter(text) {
  const terms = text.toLowerCase().split(/[\s,]+/).filter(Boolean);
  filterTerms = {
    include: terms.filter((t) => !t.startsWith("-")),
    exclude: terms.filter((t) => t.startsWith("-") && t.length > 1).map((t) => t.slice(1))
  };
}
function matches(row) {
  const type = row.type.toLowerCase();
  if (filterTerms.exclude.some((t) => type.includes(t))) return false;
  return filterTerms.include.length === 0 || filterTerms.include.some((t) => type.includes(t));
}
function cell(text, cls) {
  const td = document.createElement("td");
  td.className = cls;
  td.textContent = text;
  return td;
}
function rowElement(row) {
  const tr = document.createElement("tr");
  tr.dataset["id"] = String(row.id);
  tr.dataset["type"] = row.type;
  if (row.seq !== void 0) tr.dataset["seq"] = String(row.seq);
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
  tr.append(time, cell(row.seq === void 0 ? "" : String(row.seq), "c-seq"), typeCell, summary);
  return tr;
}
function renderCount() {
  const shown = ui.rows.childElementCount;
  let text = shown === rows.length ? `${rows.length} events` : `${shown} of ${rows.length} events`;
  if (dropped > 0) text += ` · ${dropped} oldest dropped`;
  ui.count.textContent = text;
  ui.empty.hidden = rows.length > 0;
}
function renderPause() {
  ui.pause.textContent = paused ? `Resume (${held.length} new)` : "Pause";
  ui.pause.setAttribute("aria-pressed", String(paused));
  ui.pause.classList.toggle("active", paused);
}
function renderAll() {
  const frag = document.createDocumentFragment();
  for (let i = rows.length - 1; i >= 0; i -= 1) {
    const row = rows[i];
    if (matches(row)) frag.append(rowElement(row));
  }
  ui.rows.replaceChildren(frag);
  renderCount();
}
function noteType(type) {
  const n = typeCounts.get(type);
  typeCounts.set(type, (n ?? 0) + 1);
  if (n === void 0) {
    const opt = document.createElement("option");
    opt.value = type;
    ui.seenTypes.append(opt);
  }
}
function show(row) {
  rows.push(row);
  noteType(row.type);
  if (matches(row)) ui.rows.prepend(rowElement(row));
  while (rows.length > MAX_ROWS) {
    const old = rows.shift();
    dropped += 1;
    ui.rows.querySelector(`tr[data-id="${old.id}"]`)?.remove();
  }
}
function addRow(row) {
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
var POSITION_FRAMES = /* @__PURE__ */ new Set(["connection.established", "status", "system.heartbeat", "pong"]);
function makeRow(type, data, local) {
  const seq = !local && !POSITION_FRAMES.has(type) && isRecord(data) && typeof data["seq"] === "number" ? data["seq"] : void 0;
  return { id: nextId++, received: /* @__PURE__ */ new Date(), type, seq, summary: summarize(type, data), data, local };
}
function setPaused(on) {
  paused = on;
  if (!on) {
    for (const row of held.splice(0)) show(row);
    renderCount();
  }
  renderPause();
}
function token(cls, text) {
  const span = document.createElement("span");
  span.className = cls;
  span.textContent = text;
  return span;
}
function appendJson(out, value, indent) {
  if (value === null || value === void 0) {
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
function renderJson(target, value) {
  const out = [];
  appendJson(out, value, "");
  target.replaceChildren(...out);
}
function select(row) {
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
  ui.detailsTitle.textContent = row.seq === void 0 ? row.type : `${row.type} · seq ${row.seq}`;
  ui.details.classList.remove("placeholder");
  renderJson(ui.details, row.data);
  ui.copy.disabled = false;
}
function rowOf(target) {
  const tr = target instanceof Element ? target.closest("tr[data-id]") : null;
  if (!(tr instanceof HTMLElement)) return void 0;
  const id = Number(tr.dataset["id"]);
  return rows.find((r) => r.id === id);
}
var client;
var reconnects = 0;
var established;
function setStatus(state, text, detail = "") {
  ui.status.dataset["state"] = state;
  ui.status.textContent = text;
  ui.status.title = detail;
  const active = state === "connecting" || state === "open" || state === "reconnecting";
  ui.connect.textContent = active ? "Disconnect" : "Connect";
  ui.connect.classList.toggle("primary", !active);
  for (const input of [ui.gateway, ui.project, ui.storyId, ui.token]) input.disabled = active;
  for (const button of [ui.modeProject, ui.modeStory]) {
    button.disabled = active;
    button.title = active ? "Disconnect to switch the view" : "";
  }
  ui.send.disabled = state !== "open" || mode !== "project";
  ui.storyRefresh.disabled = state !== "open" || mode !== "story";
  renderConnInfo();
}
function renderConnInfo() {
  const parts = [];
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
var STOP_TEXT = {
  closed: "disconnected",
  unauthenticated: "the token is missing, invalid or expired",
  forbidden: "the token does not grant this project",
  credential_expired: "the token expired",
  rate_limited: "rate limited by the gateway",
  protocol_error: "the gateway refused a message"
};
function formError(message) {
  ui.formError.hidden = message === void 0;
  ui.formError.textContent = message ?? "";
}
function socketBase(gateway) {
  const base = new URL(gateway, location.href);
  if (!["http:", "https:", "ws:", "wss:"].includes(base.protocol)) {
    throw new Error("the gateway URL must start with http://, https://, ws:// or wss://");
  }
  const path = base.pathname.replace(/\/+$/, "");
  return `${base.origin.replace(/^http/, "ws")}${path}`;
}
function projectUrl(gateway, project) {
  return `${socketBase(gateway)}/ws/${encodeURIComponent(project)}`;
}
function storeSettings(gateway, what, tokenValue) {
  try {
    localStorage.setItem(STORE.gateway, gateway);
    localStorage.setItem(what[0], what[1]);
    if (ui.remember.checked) sessionStorage.setItem(STORE.token, tokenValue);
    else sessionStorage.removeItem(STORE.token);
  } catch {
  }
}
function connect() {
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
  let url;
  try {
    url = projectUrl(gateway, project);
  } catch (err) {
    formError(`Gateway: ${err instanceof Error ? err.message : String(err)}`);
    ui.gateway.focus();
    return;
  }
  formError(void 0);
  storeSettings(gateway, [STORE.project, project], tokenValue);
  reconnects = 0;
  established = void 0;
  const c = new SwitchboardClient({ url, token: tokenValue, backoff: { initialMs: 500, maxMs: 1e4 } });
  client = c;
  c.onAny((msg) => {
    if (client === c) addRow(makeRow(msg.type, msg, false));
  });
  c.on("connection.established", (e) => {
    if (client !== c) return;
    established = e;
    setStatus("open", "open", `connected to ${url.replace(/\?.*$/, "")}`);
  });
  const local = (name, payload) => {
    if (client === c) addRow(makeRow(`client.${name}`, payload, true));
  };
  c.on("open", (e) => {
    local("open", { url: e.url.replace(/\?.*$/, "") });
  });
  c.on("close", (e) => {
    local("close", e);
    if (client === c) established = void 0;
  });
  c.on("reconnecting", (e) => {
    if (client !== c) return;
    reconnects += 1;
    local("reconnecting", e);
    setStatus(
      "reconnecting",
      `reconnecting · attempt ${e.attempt + 1}`,
      `closed with ${e.code}; next try in ${(e.delay / 1e3).toFixed(1)} s`
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
function disconnect() {
  const c = client;
  if (c) c.close();
  setStatus("idle", "disconnected");
}
function showCommandResult(state, outcome, reply) {
  ui.commandResult.dataset["state"] = state;
  ui.commandOutcome.textContent = outcome;
  if (reply === void 0) ui.commandReply.replaceChildren();
  else renderJson(ui.commandReply, reply);
}
function accepted(reply) {
  const n = reply.delivered_to;
  showCommandResult("ok", `✓ ${reply.command} accepted · delivered to ${n} worker${n === 1 ? "" : "s"}`, reply);
}
function syncCommandFields() {
  const kind = ui.commandType.value;
  for (const field of ui.commandForm.querySelectorAll("[data-command]")) {
    field.hidden = field.dataset["command"] !== kind;
  }
}
async function sendCommand() {
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
      let parameters;
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
      const shown = { error: err.code, message: err.message };
      if (err.field !== void 0) shown["field"] = err.field;
      if (err.requestId !== void 0) shown["request_id"] = err.requestId;
      showCommandResult("error", `✗ ${err.code}: ${err.message}`, shown);
    } else {
      showCommandResult("error", `✗ ${String(err)}`);
    }
  }
}
var mode = "project";
var story;
var storyId = "";
var storyAttempt = 0;
var storyMessages = 0;
var STORY_STOP_TEXT = {
  4001: "the token is missing, invalid or expired",
  4003: "the token does not grant this story"
};
function observedWebSocket(onOpen, onClose) {
  const Observed = class extends WebSocket {
    constructor(url) {
      super(url);
      this.addEventListener("open", () => onOpen(url));
      this.addEventListener("close", (ev) => onClose(ev.code, ev.reason));
    }
  };
  return Observed;
}
function percentText(p) {
  return `${Number.isInteger(p) ? p : p.toFixed(1)}%`;
}
function showTime(target, iso) {
  if (typeof iso !== "string" || iso === "") {
    target.textContent = "–";
    target.title = "";
    return;
  }
  target.textContent = iso;
  const t = new Date(iso);
  target.title = Number.isNaN(t.getTime()) ? "" : t.toLocaleString();
}
function renderStoryCount() {
  ui.storyReceived.textContent = `${storyMessages} message${storyMessages === 1 ? "" : "s"}`;
  ui.storyEmpty.hidden = ui.storyRows.childElementCount > 0;
}
function resetStoryCard(id) {
  ui.storyTitle.textContent = id === "" ? "No story" : `Story ${id}`;
  ui.storyStatus.dataset["status"] = "none";
  ui.storyStatus.textContent = "–";
  ui.storyPercent.textContent = "–";
  ui.storyBar.value = 0;
  ui.storyStep.textContent = "–";
  showTime(ui.storyUpdated, void 0);
  ui.storyJson.classList.add("placeholder");
  ui.storyJson.textContent = "The last progress message received appears here in full.";
  storyMessages = 0;
  renderStoryCount();
}
function addStoryRow(tr) {
  ui.storyRows.prepend(tr);
  while (ui.storyRows.childElementCount > MAX_ROWS) ui.storyRows.lastElementChild?.remove();
  renderStoryCount();
}
function addStoryLocal(text) {
  const tr = document.createElement("tr");
  tr.className = "local";
  tr.dataset["type"] = "local";
  const now = /* @__PURE__ */ new Date();
  const time = cell(clock(now), "c-time");
  time.title = now.toISOString();
  const what = cell(text, "c-summary");
  what.colSpan = 4;
  what.title = text;
  tr.append(time, what);
  addStoryRow(tr);
}
function showProgress(p) {
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
  const now = /* @__PURE__ */ new Date();
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
function connectStory() {
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
  let base;
  try {
    base = socketBase(gateway);
  } catch (err) {
    formError(`Gateway: ${err instanceof Error ? err.message : String(err)}`);
    ui.gateway.focus();
    return;
  }
  formError(void 0);
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
      addStoryLocal(`socket open · ${url.replace(/\?.*$/, "")}`);
      setStatus("open", "open", `watching ${url.replace(/\?.*$/, "")}`);
    },
    (code, reason) => {
      if (story !== s) return;
      addStoryLocal(`closed ${code}${reason ? ` (${reason})` : ""}`);
      setTimeout(() => {
        if (story !== s) return;
        storyAttempt += 1;
        reconnects += 1;
        addStoryLocal(`reconnecting · attempt ${storyAttempt} · after close ${code}`);
        setStatus(
          "reconnecting",
          `reconnecting · attempt ${storyAttempt}`,
          `closed with ${code}${code === 1013 ? " (try again later)" : ""}; reconnecting with backoff`
        );
      }, 0);
    }
  );
  const s = new StoryProgressSocket({
    url: base,
    storyId: id,
    token: tokenValue,
    WebSocket: WS,
    backoff: { initialMs: 500, maxMs: 1e4 },
    onProgress: (p) => {
      if (story === s) showProgress(p);
    },
    onStop: ({ code, reason }) => {
      if (story !== s) return;
      story = void 0;
      const why = STORY_STOP_TEXT[code] ?? "the gateway ended the connection";
      addStoryLocal(`stopped: ${code}${reason ? ` ${reason}` : ""}`);
      if (code === 1e3) {
        setStatus("idle", "disconnected");
        return;
      }
      setStatus("closed", `closed · ${code}`, why);
      formError(`Closed with ${code}${reason ? ` (${reason})` : ""}: ${why}.`);
    }
  });
  story = s;
  setStatus("connecting", "connecting");
  s.connect();
}
function disconnectStory() {
  const s = story;
  story = void 0;
  if (s) {
    s.close();
    addStoryLocal("closed by you");
  }
  setStatus("idle", "disconnected");
}
function setMode(next) {
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
  }
}
function switchMode(next) {
  if (next === mode) return;
  setMode(next);
  formError(void 0);
  setStatus("idle", "disconnected");
}
function restoreSettings() {
  let gateway = null;
  let project = null;
  let storyValue = null;
  let modeValue = null;
  let tokenValue = null;
  try {
    gateway = localStorage.getItem(STORE.gateway);
    project = localStorage.getItem(STORE.project);
    storyValue = localStorage.getItem(STORE.story);
    modeValue = localStorage.getItem(STORE.mode);
    tokenValue = sessionStorage.getItem(STORE.token);
  } catch {
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
  select(void 0);
  renderAll();
  renderPause();
});
ui.rows.addEventListener("click", (ev) => select(rowOf(ev.target)));
ui.tableWrap.addEventListener("keydown", (ev) => {
  if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
  ev.preventDefault();
  const current = selected ? ui.rows.querySelector(`tr[data-id="${selected.id}"]`) : null;
  const next = !current ? ui.rows.firstElementChild : ev.key === "ArrowDown" ? current.nextElementSibling : current.previousElementSibling;
  if (next instanceof HTMLElement) {
    select(rowOf(next));
    next.scrollIntoView({ block: "nearest" });
  }
});
function flashCopy(text) {
  ui.copy.textContent = text;
  setTimeout(() => ui.copy.textContent = "Copy JSON", 1500);
}
ui.copy.addEventListener("click", () => {
  if (!selected) return;
  if (!navigator.clipboard) {
    getSelection()?.selectAllChildren(ui.details);
    flashCopy("Selected: Ctrl+C");
    return;
  }
  navigator.clipboard.writeText(JSON.stringify(selected.data, null, 2)).then(
    () => flashCopy("Copied"),
    () => flashCopy("Copy failed")
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
