-- One send decision for one key, atomically, on Redis's own clock.
-- The same steps as broker/state/decision.py (decide); tests hold the two to each other.
-- KEYS[1] the key's hash, KEYS[2] its processes (sorted set: process id -> last seen, µs).
-- ARGV: see broker/state/redis.py (_args); throttled send times (µs) follow ARGV[24].
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local nominal = tonumber(ARGV[1])
local min_rate = tonumber(ARGV[2])
local max_rate = tonumber(ARGV[3])
local day_limit = tonumber(ARGV[4])
local reset_offset = tonumber(ARGV[5])
local beta = tonumber(ARGV[6])
local increase = tonumber(ARGV[7])
local boost_every = tonumber(ARGV[8])
local max_boost = tonumber(ARGV[9])
local horizon = tonumber(ARGV[10])
local lease = tonumber(ARGV[11])
local reserve = ARGV[12] == '1'
local process_id = ARGV[13]
local hwm_day = tonumber(ARGV[14])
local hwm_count = tonumber(ARGV[15])
local successes = tonumber(ARGV[16])
local pause_us = tonumber(ARGV[17])
local pause_reason = ARGV[18]
local park_us = tonumber(ARGV[19])
local park_reason = ARGV[20]
local unpark = ARGV[21] == '1'
local set_rate = tonumber(ARGV[22])
local ttl_ms = tonumber(ARGV[23])
local recent_us = tonumber(ARGV[24])

local function int(x) return string.format('%d', x) end
local function num(x) return string.format('%.17g', x) end

local h = redis.call('HMGET', KEYS[1], 'rate', 'nominal', 'next_slot', 'cut_at', 'cuts', 'boost',
  'streak', 'day', 'count', 'paused_until', 'pause_reason', 'parked_until', 'park_reason',
  'probing_until', 'last_429')
local rate = tonumber(h[1]) or 0
local stored_nominal = tonumber(h[2]) or 0
local next_slot = tonumber(h[3]) or 0
local cut_at = tonumber(h[4]) or 0
local cuts = tonumber(h[5]) or 0
local boost = tonumber(h[6]) or 1
local streak = tonumber(h[7]) or 0
local day = tonumber(h[8]) or -1
local count = tonumber(h[9]) or 0
local paused_until = tonumber(h[10]) or 0
local pause_why = h[11] or ''
local parked_until = tonumber(h[12]) or 0
local park_why = h[13] or ''
local probing_until = tonumber(h[14]) or 0
local last_429 = tonumber(h[15]) or 0

if stored_nominal ~= nominal or rate <= 0 then
  stored_nominal = nominal
  rate = nominal
end
rate = math.min(max_rate, math.max(min_rate, rate))
local today = math.floor((math.floor(now / 1000000) - reset_offset) / 86400)
if today > day then
  day = today
  count = 0
end
if process_id ~= '' then
  if hwm_day == day and hwm_count > count then count = hwm_count end
  redis.call('ZADD', KEYS[2], now, process_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. int(now - 600000000))
  redis.call('PEXPIRE', KEYS[2], ttl_ms)
end

-- feedback
local cut = 0
if set_rate > 0 then rate = math.min(max_rate, math.max(min_rate, set_rate)) end
for _ = 1, successes do
  rate = math.min(max_rate, rate * math.exp(increase * boost))
  streak = streak + 1
  if streak % boost_every == 0 then boost = math.min(max_boost, boost * 2) end
end
for i = 25, #ARGV do
  streak = 0
  boost = 1
  last_429 = now
  if tonumber(ARGV[i]) > cut_at then
    rate = math.max(min_rate, rate * (1 - beta))
    cut_at = now
    cuts = cuts + 1
    cut = 1
  end
end
if pause_us > 0 and now + pause_us > paused_until then
  paused_until = now + pause_us
  pause_why = pause_reason
end
if unpark then
  if parked_until > 0 then
    rate = nominal
    cut_at = now
    boost = 1
    streak = 0
  end
  parked_until = 0
  park_why = ''
  probing_until = 0
end
if park_us > 0 and not (parked_until > now and probing_until == 0) then
  parked_until = now + park_us
  park_why = park_reason
  probing_until = 0
end

local interval = math.max(1, math.floor(1000000 / rate + 0.5))
next_slot = math.min(next_slot, now + horizon + interval)

local granted, probe, refusal, wait, slot = 0, 0, '', 0, 0
if reserve then
  local base = now
  if next_slot >= now - math.min(math.floor(interval / 4), 50000) then base = next_slot end
  local candidate = math.max(base, paused_until)
  if parked_until > 0 and now < parked_until then
    refusal, wait = 'parked', parked_until - now
  elseif parked_until > 0 and probing_until > now then
    refusal, wait = 'probing', probing_until - now
  elseif day_limit >= 0 and count >= day_limit then
    refusal, wait = 'daily quota', ((day + 1) * 86400 + reset_offset) * 1000000 - now
  elseif candidate - now > horizon then
    refusal, wait = 'horizon', candidate - now - horizon
  else
    granted = 1
    slot = candidate
    wait = math.max(0, slot - now)
    next_slot = slot + interval
    count = count + 1
    if parked_until > 0 then
      probe = 1
      probing_until = now + lease
    end
  end
end

redis.call('HSET', KEYS[1], 'rate', num(rate), 'nominal', num(stored_nominal),
  'next_slot', int(next_slot), 'cut_at', int(cut_at), 'cuts', int(cuts), 'boost', num(boost),
  'streak', int(streak), 'day', int(day), 'count', int(count), 'paused_until', int(paused_until),
  'pause_reason', pause_why, 'parked_until', int(parked_until), 'park_reason', park_why,
  'probing_until', int(probing_until), 'last_429', int(last_429))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
local processes = redis.call('ZCOUNT', KEYS[2], now - recent_us, '+inf')

if paused_until <= now then pause_why = '' end
return {granted, int(wait), refusal, probe, int(now), int(slot),
  int(math.max(next_slot, paused_until)), num(rate), int(day), int(count),
  int(paused_until > now and paused_until or 0), pause_why, int(parked_until), park_why,
  int(last_429), cut, processes}
