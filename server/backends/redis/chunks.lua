#!lua name=agentmesh_chunks
-- agentmesh RedisChunkStore: per-task chunk logs, each append one atomic call
-- fenced against the task record (tasks.lua's {P}:task:<id>). A Redis Functions
-- library (see _scripts.py): each FCALL runs `call` (at the end). KEYS[1] is the
-- deployment's hash-tagged base ("{prefix}"); ARGV[1] names the op.
--
--   {P}:chunks:<task>   list    chunk docs (JSON); chunk n is at index n - 1
--   {P}:chunkx:<task>   string  when the log expires (Unix seconds, the caller's clock)
--
-- Both keys also get a Redis TTL of the retention, which frees them on the
-- server's own clock; the stored expiry is what the ops compare with `now`.
local RUNNING = 3

local ARGV, B

local function log_key(id) return B .. ':chunks:' .. id end
local function exp_key(id) return B .. ':chunkx:' .. id end

local function expired(id, now)
  local at = redis.call('GET', exp_key(id))
  return at and tonumber(at) <= now
end

-- ARGV: op, task id, token, max count, retention (s), now, expire_at, n, doc1..docn
-- Each doc is a JSON object; the task's attempt is prepended as "a".
local function append()
  local id = ARGV[2]
  local raw = redis.call('GET', B .. ':task:' .. id)
  if not raw then return {'notfound'} end
  local t = cjson.decode(raw)
  if t.state ~= RUNNING or t.fencing_token ~= tonumber(ARGV[3]) then
    return {'stale', tostring(t.state), tostring(t.fencing_token)}
  end
  local k = log_key(id)
  if expired(id, tonumber(ARGV[6])) then redis.call('DEL', k) end
  local n = tonumber(ARGV[8])
  local have = redis.call('LLEN', k)
  if have + n > tonumber(ARGV[4]) then return {'full', tostring(have)} end
  local head = '{"a":' .. string.format('%d', t.attempt) .. ','
  for i = 1, n do
    redis.call('RPUSH', k, head .. string.sub(ARGV[8 + i], 2))
  end
  local ttl = math.max(1, math.ceil(tonumber(ARGV[5]) * 1000))
  redis.call('SET', exp_key(id), ARGV[7], 'PX', ttl)
  redis.call('PEXPIRE', k, ttl)
  return {'ok', tostring(have + 1), tostring(t.attempt)}
end

-- ARGV: op, task id, after seq, limit, now
local function range()
  local id = ARGV[2]
  if expired(id, tonumber(ARGV[5])) then return {} end
  local start = tonumber(ARGV[3])
  return redis.call('LRANGE', log_key(id), start, start + tonumber(ARGV[4]) - 1)
end

local OPS = {append = append, range = range}
local READ_ONLY = {range = true}

local function call(keys, args)
  ARGV, B = args, keys[1]
  local op = OPS[args[1]]
  if not op then return redis.error_reply('agentmesh: unknown chunk op ' .. tostring(args[1])) end
  return op()
end

local function call_ro(keys, args)
  if not READ_ONLY[args[1]] then
    return redis.error_reply('agentmesh: not a read-only chunk op ' .. tostring(args[1]))
  end
  return call(keys, args)
end
