-- Story progress (docs/protocol.md §9): a story's latest progress and its PUBLISH, atomic.
-- KEYS[1] story:{id}:progress (hash-tagged story:{<id>}:progress on a cluster)
-- ARGV[1] the progress JSON (already checked)   ARGV[2] TTL in seconds
-- ARGV[3] 'publish' (store, then PUBLISH; returns the receivers) or 'relay' (a raw PUBLISH
--         the gateway saw: store only if not older than what is stored; returns 1 if stored)
-- ARGV[4] its updated_at ('' when it has none: a message without one is always newer)
-- ARGV[5] the channel story:<id> (an argument: on a cluster it is in another slot, and a
--         classic PUBLISH reaches every node anyway). Callers of the first version passed
--         it as KEYS[2] instead; that still works on one Redis.
local key, channel = KEYS[1], KEYS[2] or ARGV[5]
local payload, ttl, mode, updated = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if mode == 'relay' and updated ~= '' then
  local current = redis.call('GET', key)
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok and type(decoded) == 'table' and type(decoded.updated_at) == 'string'
      and decoded.updated_at > updated then
      return 0
    end
  end
end
redis.call('SET', key, payload, 'EX', ttl)
if mode == 'relay' then
  return 1
end
return redis.call('PUBLISH', channel, payload)
