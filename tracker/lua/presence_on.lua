-- Connections of one org going online, many per call: (driver, conn, name, line) each. Publishes
-- the presence line, kicks an older connection of the driver (on any instance), and returns, per
-- connection: the driver's newest live position ("<live ts>\t<frame>", or false), the
-- connection's generation, and whether it is still the driver's current connection when the
-- script ends (a later connection of the same driver in this call supersedes it).
-- KEYS: pconn, pgen, pstamp, presence, names, lastpos, pinst (redis_keys.Naming.presence_keys).
-- ARGV: expiry, publish command, live channel, the org's control channel, org, this instance's kick
-- channel, then the connections.
--
-- This script is the one serialisation point across instances: "newest" means registered last
-- here. A generation grows per driver (and with the server's clock, so that it still grows after
-- Redis lost its state); `kick` carries it, and an instance closes (4001) its connections of that
-- driver with a lower one. A kick that arrives late never closes a newer connection. The kick goes
-- to the instance that registered the replaced connection (pinst: driver -> its kick channel; a
-- classic PUBLISH, heard by that instance only), or, when that is unknown (a record re-created by
-- a refresh after Redis lost its state, or written by the previous release), on the org's control
-- channel, which every instance holding a driver of the org listens to from before it registers
-- that driver's connection.
local pconn, pgen, pstamp, presence, names, lastpos = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local pinst = KEYS[7]
local exp, pub, channel, ctl, org, here = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local find, sub = string.find, string.sub
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local entries = {}
for i = 7, #ARGV, 4 do
  local driver, conn, name, line = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local prev = redis.call('HGET', pconn, driver)
  local prev_at = redis.call('HGET', pinst, driver)
  redis.call('HSET', pinst, driver, here)
  local gen = tonumber(redis.call('HGET', pgen, driver) or '0') + 1
  if gen < clock then gen = clock end
  local gens = string.format('%.0f', gen)
  redis.call('HSET', pgen, driver, gens)
  redis.call('HSET', pconn, driver, conn)
  redis.call('HSET', pstamp, driver, sub(line, 1, find(line, '\t', 1, true) - 1))
  redis.call('ZADD', presence, exp, driver)
  if name ~= '' then redis.call('HSET', names, driver, name) end
  redis.call(pub, channel, line)
  if prev and prev ~= conn then
    local kick = 'kick\t' .. org .. '\t' .. driver .. '\t' .. conn .. '\t' .. gens
    if prev_at then redis.call('PUBLISH', prev_at, kick) else redis.call(pub, ctl, kick) end
  end
  entries[#entries + 1] = {driver, conn}
  out[#out + 1] = redis.call('HGET', lastpos, driver)
  out[#out + 1] = gens
  out[#out + 1] = 0
end
for j, e in ipairs(entries) do
  if redis.call('HGET', pconn, e[1]) == e[2] then out[3 * j] = 1 end
end
return out
