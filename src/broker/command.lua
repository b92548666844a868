-- Switchboard command relay (docs/protocol.md §6, §7, §11): publish a client's command to the
-- project's workers and count who received it. Workers subscribed to the channel themselves
-- count one each (PUBLISH's answer); a gateway instance holding workers' command streams
-- (GET /v1/projects/{id}/commands) is one subscriber of the channel but hands the command to
-- each of its streams, so it counts as many as it holds. Instances register their count in
-- KEYS[2] as "<count>:<until_ms>"; an entry past its time belongs to an instance that is gone
-- (it stopped refreshing) and is dropped here. The script touches only its declared keys, so
-- it runs unchanged on one Redis and in a cluster slot.
--
-- KEYS[1] project:{id}:commands          channel: classic, or sharded on a cluster (SPUBLISH)
-- KEYS[2] project:{id}:command_streams   hash instance_id -> "<streams held>:<until_ms>"
-- ARGV[1] the command JSON
-- ARGV[2] now, unix milliseconds
-- ARGV[3] on a cluster, the seed's classic channel project:<id>:commands, PUBLISHed too
--         (seed workers); '' elsewhere
-- Returns { receivers, classic }: receivers through KEYS[1] and the command streams, and the
-- subscribers of ARGV[3] on this node (0 without it; on a cluster the gateway counts those on
-- every node itself: a script only sees its own node).

local n
if string.find(KEYS[1], '{', 1, true) then
  n = redis.call('SPUBLISH', KEYS[1], ARGV[1])
else
  n = redis.call('PUBLISH', KEYS[1], ARGV[1])
end
local classic = 0
if ARGV[3] ~= '' then
  classic = redis.call('PUBLISH', ARGV[3], ARGV[1])
end
local now = tonumber(ARGV[2])
local held = redis.call('HGETALL', KEYS[2])
for i = 1, #held, 2 do
  local count, untl = string.match(held[i + 1], '^(%d+):(%d+)$')
  count = tonumber(count) or 0
  if count > 0 and (tonumber(untl) or 0) > now then
    n = n + count - 1
  else
    redis.call('HDEL', KEYS[2], held[i])
  end
end
return { n, classic }
