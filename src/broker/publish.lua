-- Switchboard publish script (PROTOCOL §7). The ONE place where an event gets its seq.
-- Shared by the gateway, `switchboard publish` (through the gateway's HTTP API) and the
-- publisher libraries (which EVAL this same file). Atomically, for one project:
--   1. make sure the project has a history epoch (a new epoch wipes any stale history,
--      so a restarted seq can never be confused with an old one);
--   2. for each event: seq = seq + 1, append to the history stream (id "<seq>-0"),
--      PUBLISH to the live channel;
--   3. refresh the age bound (TTL) of the seq hash and the history.
--
-- KEYS[1] project:{id}:seq      hash {seq, epoch}
-- KEYS[2] project:{id}:history  stream, field "event" = the event JSON with its seq
-- KEYS[3] project:{id}:events   pub/sub channel
-- ARGV[1] epoch to use if the project has none yet (random, chosen by the caller)
-- ARGV[2] history max length (approximate trimming)
-- ARGV[3] history TTL in seconds (0 = no TTL)
-- ARGV[4..] events: JSON objects WITHOUT "seq"; each must end with "}"
-- Returns { epoch, { seq, ... }, last_seq }. With no events it only reports the position.

local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local maxlen = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local seqs = {}
for i = 4, #ARGV do
  local ev = ARGV[i]
  if string.sub(ev, 1, 1) ~= '{' or string.sub(ev, -1) ~= '}' then
    return redis.error_reply('ERR event ' .. (i - 3) .. ' is not a JSON object')
  end
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  local body
  if string.match(ev, '^{%s*}$') then
    body = '{"seq":' .. seq .. '}'
  else
    body = string.sub(ev, 1, -2) .. ',"seq":' .. seq .. '}'
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, seq .. '-0', 'event', body)
  redis.call('PUBLISH', KEYS[3], body)
  seqs[#seqs + 1] = seq
end
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  if #seqs > 0 then
    redis.call('EXPIRE', KEYS[2], ttl)
  end
end
local last = tonumber(redis.call('HGET', KEYS[1], 'seq'))
return { epoch, seqs, last }
