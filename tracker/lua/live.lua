-- One call per flush: on one Redis every org of the window, on a cluster the orgs of one slot.
-- KEYS[k]: the k-th block's latest-positions hash. ARGV[1]: PUBLISH, or SPUBLISH on a cluster; then
-- per block: channel, np, na, np drivers, np live ts, np position lines, na lines always published.
-- A line is "<stamp>\t<frame>". A position is kept (and published) only if it is newer than the
-- driver's stored one, so a late event never overwrites a newer one; per block HMGET and HSET run
-- once, and one message is published, led by "#<Redis time in ms>".
local find, sub, concat = string.find, string.sub, table.concat
local pub = ARGV[1]
local t = redis.call('TIME')
local head = '#' .. string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
local a, total = 2, 0
for k = 1, #KEYS do
  local poskey, channel, np, na = KEYS[k], ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local d0 = a + 3 -- ARGV index of the first driver
  local newest = {}
  for c = d0, d0 + np - 1, 4000 do
    local last = math.min(c + 3999, d0 + np - 1)
    local cur = redis.call('HMGET', poskey, unpack(ARGV, c, last))
    for j = c, last do
      local v = cur[j - c + 1]
      if v then newest[ARGV[j]] = tonumber(sub(v, 1, find(v, '\t', 1, true) - 1)) end
    end
  end
  local out, kv = {head}, {}
  for i = d0, d0 + np - 1 do
    local d, lts = ARGV[i], tonumber(ARGV[i + np])
    local have = newest[d]
    if (not have) or have < lts then
      newest[d] = lts
      local line = ARGV[i + 2 * np]
      kv[d] = ARGV[i + np] .. '\t' .. line
      out[#out + 1] = line
    end
  end
  for i = d0 + 3 * np, d0 + 3 * np + na - 1 do out[#out + 1] = ARGV[i] end
  local args = {}
  for d, v in pairs(kv) do
    args[#args + 1] = d
    args[#args + 1] = v
    if #args >= 7998 then redis.call('HSET', poskey, unpack(args)); args = {} end
  end
  if #args > 0 then redis.call('HSET', poskey, unpack(args)) end
  if #out > 1 then
    redis.call(pub, channel, concat(out, '\n'))
    total = total + #out - 1
  end
  a = d0 + 3 * np + na
end
return total
