"""The Lua scripts the Redis store runs: each write that must be atomic is one script."""

# Liveness uses the Redis server's clock (TIME), so machines whose clocks disagree still agree on who is
# alive. Scripts run atomically; Redis 7 replicates their effects, so TIME inside a writing script is fine.
NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: instance hash, instances zset. ARGV: instance id, ttl ms, then field, value pairs.
REGISTER_INSTANCE_LUA = (
    NOW_LUA
    + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'last_seen', string.format('%.6f', now), 'load', '{}', unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
"""
)

# KEYS: instance hash, instances zset. ARGV: instance id, ttl ms, load JSON or '', models JSON or ''.
HEARTBEAT_LUA = (
    NOW_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'last_seen', string.format('%.6f', now))
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'load', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'models_resident', ARGV[4]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
"""
)

# The requests index is a zset scored by when the record expires (+inf while in flight), so expired ids
# leave it in one ZREMRANGEBYSCORE alongside their hashes' own expiry.
# KEYS: request hash, requests zset. ARGV: request id, ttl ms or '', then field, value pairs.
PUT_REQUEST_LUA = (
    NOW_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if ARGV[2] == '' then
  redis.call('ZADD', KEYS[2], '+inf', ARGV[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]) / 1000, ARGV[1])
end
return 1
"""
)

# KEYS: request hash, requests zset. ARGV: request id, expiry ('' keep, 'persist', or ttl ms), number of
# field, value pairs n, the pairs, then the fields to delete.
UPDATE_REQUEST_LUA = (
    NOW_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[3])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + 2 * n)) end
if #ARGV > 3 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 4 + 2 * n)) end
if ARGV[2] == 'persist' then
  redis.call('PERSIST', KEYS[1])
  redis.call('ZADD', KEYS[2], '+inf', ARGV[1])
elseif ARGV[2] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]) / 1000, ARGV[1])
end
return 1
"""
)

# KEYS: request hash. ARGV: token ids as "1,2,3", their count, first_token_s or ''.
APPEND_OUTPUT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ids = redis.call('HGET', KEYS[1], 'output_token_ids')
if not ids or ids == '[]' then
  ids = '[' .. ARGV[1] .. ']'
else
  ids = string.sub(ids, 1, -2) .. ',' .. ARGV[1] .. ']'
end
redis.call('HSET', KEYS[1], 'output_token_ids', ids)
redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], 'first_token_s', ARGV[3]) end
return 1
"""
