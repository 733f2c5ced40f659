-- One call per org per tick. ARGV: org, np, then np drivers, np live ts and np lines of positions,
-- then lines always published. A line is "<stamp>\t<frame>". A position is kept (and published)
-- only if it is newer than the driver's stored one, so a late event never overwrites a newer one;
-- HMGET and HSET run once for the whole tick.
local org, np = ARGV[1], tonumber(ARGV[2])
local poskey = 'trk:lastpos:' .. org
local find, sub = string.find, string.sub
local newest = {}
for c = 3, 2 + np, 4000 do
  local last = math.min(c + 3999, 2 + np)
  local cur = redis.call('HMGET', poskey, unpack(ARGV, c, last))
  for j = c, last do
    local v = cur[j - c + 1]
    if v then newest[ARGV[j]] = tonumber(sub(v, 1, find(v, '\t', 1, true) - 1)) end
  end
end
local out, kv = {}, {}
for i = 3, 2 + np do
  local d, lts = ARGV[i], tonumber(ARGV[i + np])
  local have = newest[d]
  if (not have) or have < lts then
    newest[d] = lts
    local line = ARGV[i + 2 * np]
    kv[d] = ARGV[i + np] .. '\t' .. line
    out[#out + 1] = line
  end
end
for i = 3 + 3 * np, #ARGV do out[#out + 1] = ARGV[i] end
local args = {}
for d, v in pairs(kv) do
  args[#args + 1] = d
  args[#args + 1] = v
  if #args >= 7998 then redis.call('HSET', poskey, unpack(args)); args = {} end
end
if #args > 0 then redis.call('HSET', poskey, unpack(args)) end
if #out > 0 then
  local t = redis.call('TIME')
  table.insert(out, 1, '#' .. string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000)))
  redis.call('PUBLISH', 'trk:live:' .. org, table.concat(out, '\n'))
end
return #out
