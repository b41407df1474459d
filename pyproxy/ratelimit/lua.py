"""The Lua scripts of the Redis-backed limiter (``pyproxy.ratelimit.redis_backend``).

One script, ``HIT``, decides and charges every check of a request in one atomic step, on Redis's
clock; the small ones serve the penalty box's admin operations and the cluster's compensation.

Numbers in Redis's Lua 5.1 are doubles, so the scripts keep to integers below 2^53 and never let Lua
turn a large number into a string (``tostring`` and ``..`` print 14 significant digits, which would
round a microsecond timestamp; numbers passed to ``redis.call`` or returned are converted exactly).

- Time: ``TIME`` in integer microseconds (≈ 1.8e15 now, below 2^53 until the year 2255).
- ``floor(a / b)`` is ``(a - fmod(a, b)) / b``: ``fmod`` is exact on doubles, so the division is of
  a multiple of ``b`` and exact too. Every product (``P·(W−e)``, ``(s+1)·W``) is kept below 2^53 by
  the caller: a counter check's time is counted in ``unit`` microseconds, ``unit`` the smallest with
  ``(limit + 1) · window_in_units ≤ 2^53`` (1 µs for every practical limit: 1 hour allows limits up
  to 2.5 million).

Key layout (built by the caller; ``{K}`` is the check's key with ``{`` ``}`` ``%`` percent-escaped,
so the hash tag is exactly the key and all state of one key shares a Redis Cluster slot):

- ``<prefix>{K}:c:<limit>:<window µs>``  hash ``i`` (window index), ``p`` (previous window's count),
  ``c`` (current window's count), ``t`` (latest time seen, µs); expires 2 windows after its last
  charge, when it can no longer change a decision.
- ``<prefix>{K}:l:<limit>:<window µs>``  sorted set, one member per unit of cost (``<nonce>.<j>``,
  score = time in µs), so ``ZCARD`` is the sum of the costs in the window and the wait for ``x``
  units is one ``ZRANGE`` by rank; at most ``limit`` members; expires one window after its last
  charge.
- ``<prefix>{K}:b``  penalty box: hash ``u`` (blocked until, µs), ``n`` (strikes: blocks so far).
- ``<prefix>{K}:v``  violations counted in the current violation window (a counter that expires).

The arithmetic is that of ``core_rs/src/window.rs`` with microseconds for nanoseconds: the counter's
estimate ``⌊P·(W−e)/W⌋ + C``, allowed iff ``estimate + cost ≤ L``, the exact ``retry_after`` from
solving the interpolation for ``e``; the log allows iff the costs in ``(now − W, now]`` plus ``cost``
are ``≤ L``. Like the Rust limiter's clock, each key keeps the latest time it has seen and treats an
earlier ``TIME`` (a clock stepped back, a failover to a node whose clock is behind) as that time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = ["BLOCK", "BLOCK_STATE", "HIT", "REFUND", "UNBLOCK", "Script"]


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1 (what ``EVALSHA`` names it by)."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# Shared helpers, prepended to the scripts that use them.
_PRELUDE = r"""
local fmod = math.fmod
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- floor(a / b) for integers 0 <= a < 2^53, b >= 1: exact
local function idiv(a, b)
  return (a - fmod(a, b)) / b
end
-- ceil(a / b), same domain
local function cdiv(a, b)
  local r = fmod(a, b)
  local q = (a - r) / b
  if r > 0 then q = q + 1 end
  return q
end
-- ceil(us / 1000) + 1: a PEXPIRE that outlives a span of us microseconds
local function ms(us)
  return cdiv(us, 1000) + 1
end
"""

# HIT: decide (and, unless peeking, charge) the checks of one request.
#
# KEYS: the n checks' state keys, then for each of the m penalty keys its block and violation keys.
# ARGV[1]: little-endian doubles (integers, all below 2^53):
#   n, m, 1 charge / 0 peek, the reply's form (1 little-endian 8-byte integers, 0 space-separated
#   decimals: for clients that decode replies as text); then per check kind (1 counter, 2 log),
#   limit, window (counter: in units; log: µs), unit (µs), cost, penalty index (1..m, 0 for none);
#   then per penalty key max_violations, violation_window (µs), block_for (µs), block_max (µs).
#   One struct.unpack reads them all: parsing a space-separated string with gmatch cost ~3.5 µs of
#   a ~22 µs script (measured). ARGV[2]: the nonce (unique per request), which names the members a
#   sliding_log check adds; absent when the request has none.
# Reply, integers: allowed (1/0), now (µs); per check: ok (its limit admits; 1/0), remaining, wait
#   (µs, -1 never), reset (µs until its usage has aged out entirely), window index charged (counter);
#   per penalty key: blocked before this request (1/0), blocked until (µs, 0 if never), strikes,
#   violations in the current violation window.
HIT = Script(
    "hit",
    _PRELUDE
    + r"""
local ARG = {struct.unpack('<' .. string.rep('d', #ARGV[1] / 8), ARGV[1])}
local nonce = ARGV[2]
local n = ARG[1]
local m = ARG[2]
local charge = ARG[3] == 1
local binary = ARG[4] == 1
local A = 4                -- ARG offset of the checks
local PA = A + 6 * n       -- ARG offset of the penalty keys

-- first offset e' of a window of w units at which floor(p * (w - e') / w) <= s  (p > 0)
local function first_fit(w, p, s)
  local f = w + 1 - cdiv((s + 1) * w, p)
  if f < 0 then f = 0 end
  return f
end

-- penalty box state
local pu, pn, pv, was = {}, {}, {}, {}
for j = 1, m do
  local b = redis.call('HMGET', KEYS[n + 2 * j - 1], 'u', 'n')
  pu[j] = tonumber(b[1]) or 0
  pn[j] = tonumber(b[2]) or 0
  was[j] = pu[j] > now
  pv[j] = 0
end

local allowed = true
local ok, rem, wait, reset, st = {}, {}, {}, {}, {}
for i = 1, n do
  local a = A + 6 * (i - 1)
  local kind = ARG[a + 1] == 1 and 'c' or 'l'
  local limit = ARG[a + 2]
  local w = ARG[a + 3]
  local unit = ARG[a + 4]
  local cost = ARG[a + 5]
  local key = KEYS[i]
  if kind == 'c' then
    local h = redis.call('HMGET', key, 'i', 'p', 'c', 't')
    local tl = tonumber(h[4]) or 0
    local nw = now
    if nw < tl then nw = tl end
    local x = idiv(nw, unit)
    local sub = nw - x * unit        -- µs past the last whole unit (0 when unit == 1)
    local e = fmod(x, w)
    local idx = (x - e) / w
    local i0 = tonumber(h[1])
    local p, c = 0, 0
    if i0 ~= nil then
      p = tonumber(h[2]) or 0
      c = tonumber(h[3]) or 0
      if idx > i0 then
        if idx == i0 + 1 then p = c else p = 0 end
        c = 0
      end
    end
    local used = idiv(p * (w - e), w) + c
    if used + cost <= limit then
      ok[i] = 1; rem[i] = limit - used - cost; wait[i] = 0
    else
      allowed = false
      ok[i] = 0
      rem[i] = limit - used
      if rem[i] < 0 then rem[i] = 0 end
      if cost > limit then
        wait[i] = -1
      else
        local u
        if c + cost <= limit then
          -- later in this window (p > 0 here, else the hit would have fitted)
          u = first_fit(w, p, limit - c - cost) - e
          if u < 0 then u = 0 end
        else
          -- only the next window can take it; there the previous count is c > limit - cost >= 0
          u = (w - e) + first_fit(w, c, limit - cost)
        end
        u = u * unit - sub
        if u < 0 then u = 0 end
        wait[i] = u
      end
    end
    -- the stored window is not this one (or there is none): i and p change, and the expiry moves
    st[i] = {kind, key, w, unit, cost, idx, e, sub, p, c, nw, i0 == nil or idx > i0}
  else
    local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    local nw = now
    if top[2] ~= nil and tonumber(top[2]) > nw then nw = tonumber(top[2]) end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', nw - w)
    local used = redis.call('ZCARD', key)
    local newest = 0
    if used > 0 then newest = tonumber(top[2]) end
    if used + cost <= limit then
      ok[i] = 1; rem[i] = limit - used - cost; wait[i] = 0
    else
      allowed = false
      ok[i] = 0
      rem[i] = limit - used
      if rem[i] < 0 then rem[i] = 0 end
      if cost > limit then
        wait[i] = -1
      else
        -- until the unit of rank (cost - remaining) from the oldest has aged out
        local r = redis.call('ZRANGE', key, cost - rem[i] - 1, cost - rem[i] - 1, 'WITHSCORES')
        local u = tonumber(r[2]) + w - nw
        if u < 0 then u = 0 end
        wait[i] = u
      end
    end
    st[i] = {kind, key, w, unit, cost, 0, 0, 0, newest, used, nw}
  end
  local pj = ARG[a + 6]
  if pj > 0 and was[pj] then
    allowed = false
  end
end

local do_charge = charge and allowed
for i = 1, n do
  local s = st[i]
  local kind, key, w, unit, cost = s[1], s[2], s[3], s[4], s[5]
  if kind == 'c' then
    local idx, e, sub, p, c, nw, moved = s[6], s[7], s[8], s[9], s[10], s[11], s[12]
    if do_charge and cost > 0 then
      c = c + cost
      if moved then
        redis.call('HSET', key, 'i', idx, 'p', p, 'c', c, 't', nw)
        -- Two windows from the first charge of this window reach past the end of the next one,
        -- the last that can read this window's count; a charge there moves the expiry again.
        -- (Refreshing it on every charge cost ~1 us of the script's ~28 per check, measured.)
        redis.call('PEXPIRE', key, ms(2 * w * unit))
      else
        redis.call('HSET', key, 'c', c, 't', nw)
      end
    end
    -- time until the estimate is back to 0
    local r = 0
    if c > 0 then
      r = (w - e) + first_fit(w, c, 0)
    elseif p > 0 then
      r = first_fit(w, p, 0) - e
      if r < 0 then r = 0 end
    end
    r = r * unit - sub
    if r < 0 then r = 0 end
    reset[i] = r
  else
    local newest, used, nw = s[9], s[10], s[11]
    if do_charge and cost > 0 then
      local j = 1
      while j <= cost do
        local args = {}
        local last = j + 499
        if last > cost then last = cost end
        for q = j, last do
          args[#args + 1] = nw
          args[#args + 1] = nonce .. '.' .. q
        end
        redis.call('ZADD', key, unpack(args))
        j = last + 1
      end
      redis.call('PEXPIRE', key, ms(w))
      newest = nw
      used = used + cost
    end
    if used > 0 then
      reset[i] = newest + w - nw
      if reset[i] < 0 then reset[i] = 0 end
    else
      reset[i] = 0
    end
  end
end

-- penalty box: a violation for each key not already blocked one of whose own limits denied
if charge and not allowed then
  local hurt = {}
  for i = 1, n do
    local pj = ARG[A + 6 * (i - 1) + 6]
    if pj > 0 and ok[i] == 0 and not was[pj] then hurt[pj] = true end
  end
  for j = 1, m do
    if hurt[j] then
      local b = PA + 4 * (j - 1)
      local maxv = ARG[b + 1]
      local vw = ARG[b + 2]
      local bfor = ARG[b + 3]
      local bmax = ARG[b + 4]
      local vkey = KEYS[n + 2 * j]
      local v = redis.call('INCR', vkey)
      if v == 1 then redis.call('PEXPIRE', vkey, ms(vw)) end
      pv[j] = v
      if v > maxv then
        local dur = bfor
        local k = 0
        while k < pn[j] and dur < bmax do
          dur = dur * 2
          k = k + 1
        end
        if dur > bmax then dur = bmax end
        pu[j] = now + dur
        pn[j] = pn[j] + 1
        local bkey = KEYS[n + 2 * j - 1]
        redis.call('HSET', bkey, 'u', pu[j], 'n', pn[j])
        local keep = bmax
        if vw > keep then keep = vw end
        redis.call('PEXPIRE', bkey, ms(dur + keep))
        redis.call('DEL', vkey)
        pv[j] = 0
      end
    end
  end
else
  for j = 1, m do
    pv[j] = tonumber(redis.call('GET', KEYS[n + 2 * j]) or '0') or 0
  end
end

-- Packed integers (one struct.pack; the client unpacks them in one call), or one space-separated
-- string: both far cheaper to read than an array reply of integers (measured). '%d' prints the
-- integers exactly ('..' and tostring would print 14 significant digits).
local out = {allowed and 1 or 0, now}
for i = 1, n do
  local k = #out
  out[k + 1] = ok[i]; out[k + 2] = rem[i]; out[k + 3] = wait[i]; out[k + 4] = reset[i]; out[k + 5] = st[i][6]
end
for j = 1, m do
  local k = #out
  out[k + 1] = was[j] and 1 or 0; out[k + 2] = pu[j]; out[k + 3] = pn[j]; out[k + 4] = pv[j]
end
if binary then
  return struct.pack('<' .. string.rep('i8', #out), unpack(out))
end
return string.format(string.rep('%d ', #out), unpack(out))
""",
)

# REFUND: take back what HIT charged (Redis Cluster, when another slot of the same request denied).
# KEYS: state keys HIT charged. ARGV: [1] nonce of that HIT; per key kind, window index, cost.
REFUND = Script(
    "refund",
    r"""
local nonce = ARGV[1]
for i = 1, #KEYS do
  local a = 1 + 3 * (i - 1)
  local kind = ARGV[a + 1]
  local idx = tonumber(ARGV[a + 2])
  local cost = tonumber(ARGV[a + 3])
  local key = KEYS[i]
  if kind == 'c' then
    local h = redis.call('HMGET', key, 'i', 'p', 'c')
    local i0 = tonumber(h[1])
    if i0 == idx then
      local c = (tonumber(h[3]) or 0) - cost
      if c < 0 then c = 0 end
      redis.call('HSET', key, 'c', c)
    elseif i0 == idx + 1 then
      local p = (tonumber(h[2]) or 0) - cost
      if p < 0 then p = 0 end
      redis.call('HSET', key, 'p', p)
    end
  else
    local j = 1
    while j <= cost do
      local members = {}
      local last = j + 499
      if last > cost then last = cost end
      for q = j, last do members[#members + 1] = nonce .. '.' .. q end
      redis.call('ZREM', key, unpack(members))
      j = last + 1
    end
  end
end
return #KEYS
""",
)

# BLOCK: put a key in the penalty box for ARGV[1] µs from now (keeps its strikes).
# KEYS: [1] block key. Reply: now, blocked until (µs).
BLOCK = Script(
    "block",
    _PRELUDE
    + r"""
local dur = tonumber(ARGV[1])
local u = now + dur
redis.call('HSET', KEYS[1], 'u', u)
local ttl = redis.call('PTTL', KEYS[1])
if ttl < ms(dur) then redis.call('PEXPIRE', KEYS[1], ms(dur)) end
return {now, u}
""",
)

# BLOCK_STATE: KEYS [1] block key, [2] violation key. Reply: now, blocked until (µs, 0 if never),
# strikes, violations in the current violation window.
BLOCK_STATE = Script(
    "block_state",
    _PRELUDE
    + r"""
local b = redis.call('HMGET', KEYS[1], 'u', 'n')
local v = redis.call('GET', KEYS[2])
return {now, tonumber(b[1]) or 0, tonumber(b[2]) or 0, tonumber(v or '0') or 0}
""",
)

# UNBLOCK: forget a key's block, strikes and violations. KEYS [1] block key, [2] violation key.
# Reply: 1 if the key was blocked at that moment, else 0.
UNBLOCK = Script(
    "unblock",
    _PRELUDE
    + r"""
local u = tonumber(redis.call('HGET', KEYS[1], 'u') or '0') or 0
redis.call('DEL', KEYS[1], KEYS[2])
if u > now then return 1 end
return 0
""",
)
