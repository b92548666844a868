-- Switchboard publish script (docs/protocol.md §7). The ONE place where an event gets its seq.
-- Shared by the gateway, `switchboard publish` (through the gateway's HTTP API) and the
-- publisher libraries (which EVAL this same file). Atomically, for one project:
--   1. make sure the project has a history epoch (a new epoch wipes any stale history and
--      state, so a restarted seq can never be confused with an old one);
--   2. for each event: seq = seq + 1, append to the history stream (id "<seq>-0"), update
--      the status snapshot state, PUBLISH to the live channel (with the publish mark);
--   3. age out terminal tasks from the state, refresh the TTLs (age bound of history/state).
--
-- KEYS[1] project:{id}:seq      hash {seq, epoch}
-- KEYS[2] project:{id}:history  stream, field "event" = the event JSON with its seq
-- KEYS[3] project:{id}:events   pub/sub channel; when hash-tagged (project:{<id>}:events, Redis
--         Cluster, docs/protocol.md §11) it is a sharded channel and gets SPUBLISH
-- KEYS[4] project:{id}:state    hash "node:<id>" / "task:<id>" -> JSON entry of the status snapshot
-- KEYS[5] project:{id}:state:terminal  zset "task:<id>" scored by finish time (ms), for aging out
-- ARGV[1] epoch to use if the project has none yet (random, chosen by the caller)
-- ARGV[2] history max length (approximate trimming)
-- ARGV[3] history/state TTL in seconds (0 = no TTL)
-- ARGV[4] now, unix milliseconds
-- ARGV[5] how long finished tasks stay in the state, milliseconds
-- ARGV[6..] events: compact JSON objects WITHOUT "seq", with "type", "project_id" and
--           "timestamp"; each must start with "{" and end with "}"
-- Returns { epoch, { seq, ... }, last_seq }. With no events it only reports the position.

local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2], KEYS[4], KEYS[5])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local maxlen = tonumber(ARGV[2])
local publish = string.find(KEYS[3], '{', 1, true) and 'SPUBLISH' or 'PUBLISH'
local ttl = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local keep_terminal = tonumber(ARGV[5])

local task_status = {
  ['task.queued'] = 'queued', ['task.started'] = 'started', ['task.progress'] = 'running',
  ['task.success'] = 'success', ['task.failed'] = 'failed', ['task.cancelled'] = 'cancelled',
}
local terminal = { success = true, failed = true, cancelled = true }

local function update_state(ev)
  local ok, obj = pcall(cjson.decode, ev)
  if not ok or type(obj) ~= 'table' then return end
  local kind = obj['type']
  local at = obj['timestamp']
  if type(at) ~= 'string' then at = nil end
  if kind == 'node.state.updated' and type(obj['node_id']) == 'string' then
    local field = 'node:' .. obj['node_id']
    local entry = {}
    local old = redis.call('HGET', KEYS[4], field)
    if old then entry = cjson.decode(old) end
    entry['state'] = obj['state']
    entry['updated_at'] = at
    redis.call('HSET', KEYS[4], field, cjson.encode(entry))
  elseif kind == 'node.progress.updated' and type(obj['node_id']) == 'string' then
    local field = 'node:' .. obj['node_id']
    local entry = {}
    local old = redis.call('HGET', KEYS[4], field)
    if old then entry = cjson.decode(old) end
    if entry['state'] == nil then entry['state'] = 'processing' end
    entry['progress'] = obj['progress']
    entry['step'] = obj['step']
    entry['updated_at'] = at
    redis.call('HSET', KEYS[4], field, cjson.encode(entry))
  elseif task_status[kind] and type(obj['task_id']) == 'string' then
    local field = 'task:' .. obj['task_id']
    local status = task_status[kind]
    local entry = { status = status, updated_at = at }
    if kind == 'task.progress' then
      entry['progress'] = obj['progress']
    else
      local old = redis.call('HGET', KEYS[4], field)
      if old then
        local prev = cjson.decode(old)
        entry['progress'] = prev['progress']
      end
    end
    if type(obj['node_id']) == 'string' then entry['node_id'] = obj['node_id'] end
    redis.call('HSET', KEYS[4], field, cjson.encode(entry))
    if terminal[status] then
      redis.call('ZADD', KEYS[5], now, field)
    else
      redis.call('ZREM', KEYS[5], field)
    end
  end
end

-- The copy PUBLISHed (not the one in history) ends with the publish mark `,"epoch":"E"`:
-- gateways count a live event's seq only when it carries the mark of the epoch they know,
-- so a legacy publisher's own "seq" field moves nobody (docs/protocol.md §3). An epoch
-- that could not sit in a JSON string unescaped gets no mark (its seqs are then not
-- believed live; nothing else changes).
local mark = ''
if string.len(epoch) <= 64 and string.match(epoch, '^[%w_%-]+$') then
  mark = ',"epoch":"' .. epoch .. '"'
end

local seqs = {}
for i = 6, #ARGV do
  local ev = ARGV[i]
  if string.sub(ev, 1, 1) ~= '{' or string.sub(ev, -1) ~= '}' then
    return redis.error_reply('ERR event ' .. (i - 5) .. ' is not a JSON object')
  end
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  local body
  if string.match(ev, '^{%s*}$') then
    body = '{"seq":' .. seq .. '}'
  else
    body = string.sub(ev, 1, -2) .. ',"seq":' .. seq .. '}'
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, seq .. '-0', 'event', body)
  update_state(ev)
  redis.call(publish, KEYS[3], string.sub(body, 1, -2) .. mark .. '}')
  seqs[#seqs + 1] = seq
end
if #seqs > 0 then
  -- Finished tasks leave the snapshot after a while, so state stays bounded.
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - keep_terminal)
  for _, field in ipairs(old) do
    redis.call('HDEL', KEYS[4], field)
  end
  if #old > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - keep_terminal)
  end
end
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  if #seqs > 0 then
    redis.call('EXPIRE', KEYS[2], ttl)
    redis.call('EXPIRE', KEYS[4], ttl)
    redis.call('EXPIRE', KEYS[5], ttl)
  end
end
local last = tonumber(redis.call('HGET', KEYS[1], 'seq'))
return { epoch, seqs, last }
