-- agentmesh RedisStateStore: each write (with its revision and change-log
-- entry) is one atomic script. KEYS[1] is the deployment's hash-tagged base
-- ("{prefix}"); ARGV[1] names the op, ARGV[2] the namespace, ARGV[3] the log size.
local B = KEYS[1]
local NS = ARGV[2]
local LOG_SIZE = tonumber(ARGV[3])
local S = B .. ':st:' .. #NS .. ':' .. NS
local ENTRIES, KEYSET, REV, LOG = S .. ':e', S .. ':k', S .. ':rev', S .. ':log'

local function log_event(kind, entry_raw)
  redis.call('RPUSH', LOG, '{"type":' .. kind .. ',"entry":' .. entry_raw .. '}')
  redis.call('LTRIM', LOG, -LOG_SIZE, -1)
end

local function remove(key, entry, now)
  redis.call('HDEL', ENTRIES, key)
  redis.call('ZREM', KEYSET, key)
  local rev = redis.call('INCR', REV)
  log_event(2, '{"key":' .. cjson.encode(key) .. ',"value":{"data":"","metadata":{}},"version":' ..
               entry.version .. ',"revision":' .. rev .. ',"update_time":' .. cjson.encode(now) ..
               ',"expire_time":"0.0"}')
  return rev
end

-- The live entry (decoded) and its JSON, or nil after removing an expired one.
local function live(key, now)
  local raw = redis.call('HGET', ENTRIES, key)
  if not raw then return nil, nil end
  local e = cjson.decode(raw)
  local exp = tonumber(e.expire_time) or 0
  if exp > 0 and exp <= tonumber(now) then
    remove(key, e, now)
    return nil, nil
  end
  return e, raw
end

local OPS = {}

function OPS.get()
  local _, raw = live(ARGV[4], ARGV[5])
  return raw or false
end

function OPS.put()
  local key, value, expected, expire, now = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  local cur = live(key, now)
  local version = 0
  if cur then version = cur.version end
  if expected ~= '' and tonumber(expected) ~= version then return {'mismatch', version} end
  local rev = redis.call('INCR', REV)
  local raw = '{"key":' .. cjson.encode(key) .. ',"value":' .. value .. ',"version":' ..
              (version + 1) .. ',"revision":' .. rev .. ',"update_time":' .. cjson.encode(now) ..
              ',"expire_time":' .. cjson.encode(expire) .. '}'
  redis.call('HSET', ENTRIES, key, raw)
  redis.call('ZADD', KEYSET, 0, key)
  log_event(1, raw)
  return {'ok', raw}
end

function OPS.delete()
  local key, expected, now = ARGV[4], ARGV[5], ARGV[6]
  local cur = live(key, now)
  if not cur then return {'notfound'} end
  if expected ~= '' and tonumber(expected) ~= cur.version then return {'mismatch', cur.version} end
  return {'ok', remove(key, cur, now)}
end

function OPS.list()
  -- ARGV[5] is the lower bound, computed by the caller (Lua string comparison
  -- follows the server's locale, not byte order)
  local prefix, min, limit, now = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
  local max = '+'
  if prefix ~= '' then max = '[' .. prefix .. '\255' end
  local out = {}
  while #out < limit do
    local keys = redis.call('ZRANGEBYLEX', KEYSET, min, max, 'LIMIT', 0, 256)
    if #keys == 0 then break end
    for _, k in ipairs(keys) do
      min = '(' .. k
      local _, raw = live(k, now)
      if raw then
        out[#out + 1] = raw
        if #out >= limit then break end
      end
    end
  end
  return out
end

function OPS.events()
  local prefix, after, limit = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  local first = redis.call('LINDEX', LOG, 0)
  if not first then return {'ok'} end
  local oldest = cjson.decode(first).entry.revision
  local current = tonumber(redis.call('GET', REV)) or 0
  if after < oldest - 1 then return {'range', oldest, current} end
  local out = {'ok'}
  if after >= current then return out end
  -- revisions in the log are contiguous: revision r sits at index r - oldest
  local index = after - oldest + 1
  while #out - 1 < limit do
    local batch = redis.call('LRANGE', LOG, index, index + 255)
    if #batch == 0 then break end
    for _, ev in ipairs(batch) do
      local k = cjson.decode(ev).entry.key
      if string.sub(k, 1, #prefix) == prefix then
        out[#out + 1] = ev
        if #out - 1 >= limit then break end
      end
    end
    index = index + 256
  end
  return out
end

local op = OPS[ARGV[1]]
if not op then return redis.error_reply('agentmesh: unknown state op ' .. tostring(ARGV[1])) end
return op()
