"""The Redis ledger's Lua scripts: each ledger operation is one script, so it runs atomically
on the Redis server (check-then-record cannot interleave across instances)."""

COMMON = r"""
local P = ARGV[1]
local function bkey(bid) return P .. ':b:' .. bid end
local function lkey(bid) return P .. ':l:' .. bid end
local function rkey(bid) return P .. ':r:' .. bid end
local function neg(s) if s == '0' then return '0' end return '-' .. s end

local function unreserve(bid, rid)
  local v = redis.call('HGET', rkey(bid), rid)
  if v then
    local sep = string.find(v, ':', 1, true)
    local B = bkey(bid)
    redis.call('HINCRBY', B, 'reserved', neg(string.sub(v, 1, sep - 1)))
    redis.call('HINCRBY', B, 'rtokens', neg(string.sub(v, sep + 1)))
    redis.call('HINCRBY', B, 'rcount', -1)
    redis.call('HDEL', rkey(bid), rid)
  end
  redis.call('ZREM', lkey(bid), rid)
end

local function clean(bid, now)
  local dead = redis.call('ZRANGEBYSCORE', lkey(bid), '-inf', now)
  for _, rid in ipairs(dead) do unreserve(bid, rid) end
end

local function read(bid)
  local v = redis.call('HMGET', bkey(bid), 'spent', 'reserved', 'tokens', 'rtokens', 'requests', 'rcount')
  for i = 1, 6 do v[i] = v[i] or '0' end
  return v
end

-- window_end: when the bucket's window ends, on Tollgate's clock (the idx score, compared
-- with its `now`: a finished window leaves the index, so reports never read it again);
-- ttl: milliseconds from now until the keys may go (a day past the window), for Redis.
local function keep_until(bid, window_end, ttl, meta)
  local B = bkey(bid)
  redis.call('HSET', B, 'meta', meta)
  if window_end ~= '' then
    redis.call('PEXPIRE', B, ttl)
    redis.call('PEXPIRE', lkey(bid), ttl)
    redis.call('PEXPIRE', rkey(bid), ttl)
    redis.call('ZADD', P .. ':idx', window_end, bid)
  else
    redis.call('ZADD', P .. ':idx', '+inf', bid)
  end
end

local function drop_request(rid)
  local Q = P .. ':q:' .. rid
  local bids = redis.call('HKEYS', Q)
  for _, bid in ipairs(bids) do unreserve(bid, rid) end
  redis.call('DEL', Q, P .. ':m:' .. rid)
  redis.call('ZREM', P .. ':leases', rid)
  return #bids
end

-- Which limit of the bucket whose arguments start at ARGV[b + 1] (RESERVE's and LEASE's
-- layout) `amt`/`tok` and one request would break on top of the 6 counters `s`, or nil.
local function over(s, b, amt, tok)
  if ARGV[b + 5] ~= '' and tonumber(s[1]) + tonumber(s[2]) + amt > tonumber(ARGV[b + 5]) then return 'usd' end
  if ARGV[b + 6] ~= '' and tonumber(s[3]) + tonumber(s[4]) + tok > tonumber(ARGV[b + 6]) then return 'tokens' end
  if ARGV[b + 7] ~= '' and tonumber(s[5]) + tonumber(s[6]) + 1 > tonumber(ARGV[b + 7]) then return 'requests' end
  return nil
end

-- RESERVE's and LEASE's reply: {ok, index of the refusing bucket, reason, 6 counters per bucket}.
local function verdict(states, n, refused, reason)
  local flat = {}
  for i = 1, n do for j = 1, 6 do flat[#flat + 1] = states[i][j] end end
  local ok = 1
  if refused ~= 0 then ok = 0 end
  return {ok, refused, reason, flat}
end

-- Record `rid` (a request or a lease) holding amt/tok on bucket `bid` until `lease`.
local function hold(bid, rid, amt, tok, lease)
  local B = bkey(bid)
  redis.call('HINCRBY', B, 'reserved', amt)
  redis.call('HINCRBY', B, 'rtokens', tok)
  redis.call('HINCRBY', B, 'rcount', 1)
  redis.call('HSET', rkey(bid), rid, amt .. ':' .. tok)
  redis.call('ZADD', lkey(bid), lease, rid)
  redis.call('HSET', P .. ':q:' .. rid, bid, '1')
end
"""

# ARGV: P, rid, now, lease_until, request_key_ttl_ms, if_interrupted ('' or
# "nanos:tokens:json"), n, then n x 10:
#   bid, amount, tokens, block, limit_nanos, limit_tokens, limit_requests, window_end, ttl_ms, meta
# (limits and window_end are '' when absent). Returns {ok (1, 0, -1 = duplicate id),
# index of the refusing bucket, reason, 6 counters per bucket}.
RESERVE = COMMON + r"""
local rid, now, lease, qttl, interrupted, n = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
if redis.call('EXISTS', P .. ':q:' .. rid) == 1 or redis.call('EXISTS', P .. ':d:' .. rid) == 1 then
  return {-1, 0, '', {}}
end
local W = 10
local states = {}
local refused, reason = 0, ''
for i = 1, n do
  local b = 7 + (i - 1) * W
  local bid = ARGV[b + 1]
  clean(bid, now)
  local s = read(bid)
  states[i] = s
  if refused == 0 and ARGV[b + 4] == '1' then
    local why = over(s, b, tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]))
    if why then refused, reason = i, why end
  end
end
if refused == 0 then
  local Q = P .. ':q:' .. rid
  for i = 1, n do
    local b = 7 + (i - 1) * W
    local bid = ARGV[b + 1]
    hold(bid, rid, ARGV[b + 2], ARGV[b + 3], lease)
    keep_until(bid, ARGV[b + 8], ARGV[b + 9], ARGV[b + 10])
    states[i] = read(bid)
  end
  if n > 0 then
    redis.call('PEXPIRE', Q, qttl)
    redis.call('ZADD', P .. ':leases', lease, rid)
    if interrupted ~= '' then redis.call('SET', P .. ':m:' .. rid, interrupted, 'PX', qttl) end
  end
end
return verdict(states, n, refused, reason)
"""

# ARGV: P, lease id, now, lease_until, request_key_ttl_ms, give_back ('1': unchecked unless it grows),
# n, then n x 10 as for RESERVE. The lease's own current size is left out of the check;
# only if every block bucket fits does the lease become the new amounts (zero: dropped
# from that bucket). Returns {ok, index of the refusing bucket, reason, 6 counters per
# bucket without this lease}.
LEASE = COMMON + r"""
local lid, now, lease, qttl, give_back, n = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local W = 10
local states = {}
local refused, reason = 0, ''
for i = 1, n do
  local b = 7 + (i - 1) * W
  local bid = ARGV[b + 1]
  clean(bid, now)
  local s = read(bid)
  local own = redis.call('HGET', rkey(bid), lid)
  local amt, tok = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  -- A give-back is unchecked only while it does not grow the lease.
  local shrinks = amt == 0 and tok == 0
  if own then
    local sep = string.find(own, ':', 1, true)
    local own_amt, own_tok = tonumber(string.sub(own, 1, sep - 1)), tonumber(string.sub(own, sep + 1))
    s[2] = string.format('%d', tonumber(s[2]) - own_amt)
    s[4] = string.format('%d', tonumber(s[4]) - own_tok)
    s[6] = string.format('%d', tonumber(s[6]) - 1)
    shrinks = shrinks or (amt <= own_amt and tok <= own_tok)
  end
  states[i] = s
  if refused == 0 and ARGV[b + 4] == '1' and not (give_back == '1' and shrinks) then
    local why = over(s, b, amt, tok)
    if why then refused, reason = i, why end
  end
end
if refused == 0 then
  drop_request(lid)
  local Q = P .. ':q:' .. lid
  local held = 0
  for i = 1, n do
    local b = 7 + (i - 1) * W
    local bid, amt, tok = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
    if amt ~= '0' or tok ~= '0' then
      hold(bid, lid, amt, tok, lease)
      held = held + 1
    end
    keep_until(bid, ARGV[b + 8], ARGV[b + 9], ARGV[b + 10])
  end
  if held > 0 then
    redis.call('PEXPIRE', Q, qttl)
    redis.call('ZADD', P .. ':leases', lease, lid)
  end
end
return verdict(states, n, refused, reason)
"""

# ARGV: P, rid, now, settled_marker_ttl_ms, spend row JSON ('' for none), spend log identity,
# n, then n x 6: bid, amount, tokens, window_end, ttl_ms, meta
# The spend row waits in P:s:<rid> (listed in P:pending:<identity>) until the settling
# instance has written it to its spend log and acknowledged it: a crash in between loses no
# row, and the instance that reopens that spend log writes it (once: keyed by ledger id).
SETTLE = COMMON + r"""
local rid, now, dttl, row, owner, n = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
if not redis.call('SET', P .. ':d:' .. rid, now, 'NX', 'PX', dttl) then
  return {0, {}}
end
drop_request(rid)
if row ~= '' then
  redis.call('SET', P .. ':s:' .. rid, row, 'PX', dttl)
  redis.call('ZADD', P .. ':pending:' .. owner, now, rid)
end
local after = {}
for i = 1, n do
  local b = 7 + (i - 1) * 6
  local bid = ARGV[b + 1]
  local B = bkey(bid)
  after[i] = redis.call('HINCRBY', B, 'spent', ARGV[b + 2])
  redis.call('HINCRBY', B, 'tokens', ARGV[b + 3])
  redis.call('HINCRBY', B, 'requests', 1)
  keep_until(bid, ARGV[b + 4], ARGV[b + 5], ARGV[b + 6])
end
return {1, after}
"""

# ARGV: P, identity, rid...: spend rows written to that spend log, no longer pending.
ACK = r"""
for i = 3, #ARGV do
  redis.call('DEL', ARGV[1] .. ':s:' .. ARGV[i])
  redis.call('ZREM', ARGV[1] .. ':pending:' .. ARGV[2], ARGV[i])
end
return #ARGV - 2
"""

# ARGV: P, identity, pending_before_ms, batch -> {rid, row JSON, ...}: rows settled for this
# spend log and not acknowledged as written (its process died in between), taken back.
CLAIM = r"""
local P, pending = ARGV[1], ARGV[1] .. ':pending:' .. ARGV[2]
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', pending, '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))) do
  local row = redis.call('GET', P .. ':s:' .. rid)
  if row then
    out[#out + 1] = rid
    out[#out + 1] = row
  end
  redis.call('DEL', P .. ':s:' .. rid)
  redis.call('ZREM', pending, rid)
end
return out
"""

# ARGV: P, rid
RELEASE = COMMON + r"""
return drop_request(ARGV[2])
"""

# ARGV: P, rid, now, settled_marker_ttl_ms: the settled marker first, so a reserve of this
# id that Redis runs later (queued while it hung) is refused as a duplicate.
ABANDON = COMMON + r"""
redis.call('SET', P .. ':d:' .. ARGV[2], ARGV[3], 'PX', ARGV[4])
return drop_request(ARGV[2])
"""

# ARGV: P, lease_until, request_key_ttl_ms, rid...  -> how many rids still held a reservation
RENEW = COMMON + r"""
local lease, qttl, renewed = ARGV[2], ARGV[3], 0
for i = 4, #ARGV do
  local rid = ARGV[i]
  local Q = P .. ':q:' .. rid
  local bids = redis.call('HKEYS', Q)
  if #bids > 0 then
    for _, bid in ipairs(bids) do redis.call('ZADD', lkey(bid), 'XX', lease, rid) end
    redis.call('ZADD', P .. ':leases', 'XX', lease, rid)
    redis.call('PEXPIRE', Q, qttl)
    renewed = renewed + 1
  end
end
return renewed
"""

# ARGV: P, now, batch, settled_marker_ttl_ms -> {dead requests, the if_interrupted JSON of
# each one settled as interrupted (its estimated input charged to its buckets)...}
EXPIRE = COMMON + r"""
local dead = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {#dead}
for _, rid in ipairs(dead) do
  local m = redis.call('GET', P .. ':m:' .. rid)
  if m and redis.call('SET', P .. ':d:' .. rid, ARGV[2], 'NX', 'PX', ARGV[4]) then
    local a = string.find(m, ':', 1, true)
    local b = string.find(m, ':', a + 1, true)
    local nanos, tokens = string.sub(m, 1, a - 1), string.sub(m, a + 1, b - 1)
    for _, bid in ipairs(redis.call('HKEYS', P .. ':q:' .. rid)) do
      redis.call('HINCRBY', bkey(bid), 'spent', nanos)
      redis.call('HINCRBY', bkey(bid), 'tokens', tokens)
      redis.call('HINCRBY', bkey(bid), 'requests', 1)
    end
    out[#out + 1] = rid
    out[#out + 1] = string.sub(m, b + 1)
  end
  drop_request(rid)
end
redis.call('ZREMRANGEBYSCORE', P .. ':idx', '-inf', '(' .. ARGV[2])
return out
"""

# ARGV: P, now, n, bid...  -> per bucket: 6 counters + meta ('' when unknown)
STATE = COMMON + r"""
local now, n = ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 1, n do
  local bid = ARGV[3 + i]
  clean(bid, now)
  local s = read(bid)
  for j = 1, 6 do out[#out + 1] = s[j] end
  out[#out + 1] = redis.call('HGET', bkey(bid), 'meta') or ''
end
return out
"""
