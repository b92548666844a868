-- Switchboard command relay (docs/protocol.md §6, §7): PUBLISH a client's command to the
-- project's workers and count who received it. Workers subscribed to the channel themselves
-- count one each (PUBLISH's answer); a gateway instance holding workers' command streams
-- (GET /v1/projects/{id}/commands) is one subscriber of the channel but hands the command to
-- each of its streams, so it counts as many as it holds. Instances register their count in
-- KEYS[2]; an instance whose registry key (ws:instance:<id>) has expired is gone, and its
-- entry is dropped here.
--
-- KEYS[1] project:{id}:commands          pub/sub channel
-- KEYS[2] project:{id}:command_streams   hash instance_id -> streams held
-- ARGV[1] the command JSON
-- ARGV[2] the instance registry key prefix ("ws:instance:")
-- Returns the number of receivers.

local n = redis.call('PUBLISH', KEYS[1], ARGV[1])
local held = redis.call('HGETALL', KEYS[2])
for i = 1, #held, 2 do
  local count = tonumber(held[i + 1]) or 0
  if count > 0 and redis.call('EXISTS', ARGV[2] .. held[i]) == 1 then
    n = n + count - 1
  else
    redis.call('HDEL', KEYS[2], held[i])
  end
end
return n
