-- One send decision for one key, atomically, on Redis's own clock.
-- The same steps as broker/state/decision.py (decide); tests hold the two to each other.
-- KEYS[1] the key's hash, KEYS[2] its processes (sorted set: process id -> last seen, µs).
-- ARGV: see broker/state/redis.py (_args); throttled send times (µs) follow ARGV[48].
-- With ARGV[25] = '1' the rate follows the ceiling-aware controller of broker/ratecontrol.py
-- (cut_rate, recovered_rate), step for step; else the plain target-loss AIMD.
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
-- 'view': decide as for reserve = 0, and store nothing (broker status reads, never writes)
local view = ARGV[12] == 'view'
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
local tuned = ARGV[25] == '1'
local recovery = ARGV[26] == '1'
local cap_beta = tonumber(ARGV[27])
local cap_zone = tonumber(ARGV[28])
local cap_gain = tonumber(ARGV[29])
local drop_beta = tonumber(ARGV[30])
local regrow_s = tonumber(ARGV[31])
local plateau = tonumber(ARGV[32])
local probe_after_s = tonumber(ARGV[33])
local probe_after_sends = tonumber(ARGV[34])
local max_probe_after_s = tonumber(ARGV[35])
local probe_gain = tonumber(ARGV[36])
local drop_window = tonumber(ARGV[37])
-- ratecontrol.PROBE_FAR (a constant, not an argument: tests/test_state_store.py pins it)
local probe_far = 2.0
local release_probe = tonumber(ARGV[38])
local probe_again = tonumber(ARGV[39])
-- '1': the process is closing (decision.py: Feedback.leaving)
local leaving = ARGV[40] == '1'
-- decision.py: Feedback.answered, Feedback.run_429s
local answered = ARGV[41] == '1'
local run_in = tonumber(ARGV[42])
-- decision.py: ProcessMark.rate, .parked_until_us, .park_reason (what the caller saw last)
local mark_rate = tonumber(ARGV[43])
local mark_parked = tonumber(ARGV[44])
local mark_park_reason = ARGV[45]
-- decision.py: ProcessMark.gen (the generation of the record the caller saw last)
local mark_gen = ARGV[46]
-- decision.py: ProcessMark.gen_sends (the sends of that generation the caller saw)
local mark_gen_sends = tonumber(ARGV[47])
-- decision.py: ProcessMark.own_sends (the sends the caller was granted in its mark's day)
local mark_own_sends = tonumber(ARGV[48])
local first_throttled = 49
local run_gap = 60000000  -- decision.py: RUN_GAP_S
local run_cuts_from = 10  -- decision.py: RUN_CUTS_FROM

local function int(x) return string.format('%d', x) end
local function num(x) return string.format('%.17g', x) end

local h = redis.call('HMGET', KEYS[1], 'rate', 'nominal', 'next_slot', 'cut_at', 'cuts', 'boost',
  'streak', 'day', 'count', 'paused_until', 'pause_reason', 'parked_until', 'park_reason',
  'probing_until', 'last_429', 'rc_top', 'rc_level', 'rc_desc', 'rc_r1', 'rc_r2', 'nominal_seen',
  'day_cap', 'day_cap_seen', 'run_429s', 'gen', 'gen_sends', 'gen_unparked', 'day_offset',
  'prior', 'own', 'answered_at')
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
-- the controller's memory: the throttled rate while recovering, the probe-wait multiplier,
-- "still coming down", and the times of the last two cuts (µs, 0: none)
local rc_top = tonumber(h[16]) or 0
local rc_level = tonumber(h[17]) or 1
local rc_desc = h[18] == '1'
local rc_r1 = tonumber(h[19]) or 0
local rc_r2 = tonumber(h[20]) or 0
-- when a process with the stored (agreed) nominal rate last asked, µs
local nominal_seen = tonumber(h[21]) or 0
-- the lowest daily limit asked with recently (-1: none), and when it was last asked with
local day_cap = tonumber(h[22]) or -1
local day_cap_seen = tonumber(h[23]) or 0
local run_429s = tonumber(h[24]) or 0
-- decision.py: Record.gen, .gen_sends, .gen_unparked
local gen = h[25] or ''
local gen_sends = tonumber(h[26]) or 0
local gen_unparked = h[27] == '1'
-- decision.py: Record.day_offset, the reset offset day was counted under (-1: unknown)
local day_offset = tonumber(h[28]) or -1
-- decision.py: Record.answered_at, when a process last told of an answer (µs; 0: never)
local answered_at = tonumber(h[31]) or 0
-- decision.py: Record.prior, the most sends each earlier generation of the day was told to
-- have granted (a JSON object; anything else reads as none)
-- A JSON object of counts by name from field value `raw` (anything else reads as none).
local function counts_of(raw)
  local out = {}
  if raw then
    local ok, decoded = pcall(cjson.decode, raw)
    if ok and type(decoded) == 'table' then
      for name, n in pairs(decoded) do
        if type(name) == 'string' and type(n) == 'number' then out[name] = n end
      end
    end
  end
  return out
end
-- decision.py (_keep_most): set counts[name], then drop the smallest (the first name of
-- equals) while more than `keep` are kept.
local function keep_most(counts, name, value, keep)
  counts[name] = value
  while true do
    local kept, smallest = 0, nil
    for other, n in pairs(counts) do
      kept = kept + 1
      if smallest == nil or n < counts[smallest] or (n == counts[smallest] and other < smallest) then
        smallest = other
      end
    end
    if kept <= keep then return end
    counts[smallest] = nil
  end
end
local prior = counts_of(h[29])
local prior_keep = 16  -- decision.py: PRIOR_KEEP
-- decision.py: Record.own, the sends each process was granted in the day
local own = counts_of(h[30])
local own_keep = 256  -- decision.py: OWN_KEEP

local function probe_wait(top)
  return rc_level * math.max(probe_after_s, probe_after_sends / (top * plateau))
end

-- ratecontrol.cut_rate: the rate after a fresh 429 at `r`; cut_at is still the last cut.
local function cut_rate(r)
  local recent = {}
  for _, t in ipairs({rc_r1, rc_r2}) do
    if t > 0 and now - t <= drop_window then recent[#recent + 1] = t end
  end
  local dropped = #recent >= 2
  recent[#recent + 1] = now
  while #recent > 2 do table.remove(recent, 1) end
  rc_r1, rc_r2 = recent[1] or 0, recent[2] or 0
  local at_cap = r >= cap_zone * max_rate
  local previous = rc_top
  local since_cut = math.huge
  if cut_at > 0 then since_cut = (now - cut_at) / 1000000 end
  if not recovery or at_cap then
    rc_top = 0
    if at_cap and not dropped then return r * (1 - cap_beta) end
    return r * (1 - beta)
  end
  local b = beta
  if dropped then b = drop_beta end
  -- A probe throttled at more than probe_far times the last limit found a new one.
  if previous > 0 and since_cut >= probe_wait(previous) and r <= probe_far * previous then
    rc_level = math.min(max_probe_after_s / probe_after_s, rc_level * 2)
    return math.min(r * (1 - b), previous * (1 - b))
  end
  rc_desc = previous > 0 and r < 0.97 * previous
  if previous <= 0 or math.abs(r - previous) > 0.1 * previous then rc_level = 1 end
  rc_top = r
  return r * (1 - b)
end

-- ratecontrol.recovered_rate: the rate after a demand-limited success with gain `gain`.
local function recovered_rate(r, gain)
  if r >= cap_zone * max_rate and not (max_rate > nominal) then gain = cap_gain end
  local grown = r * math.exp(gain)
  if recovery and rc_top > 0 then
    local t = math.huge
    if cut_at > 0 then t = (now - cut_at) / 1000000 end
    local wait = probe_wait(rc_top)
    local cutf = 1 - beta
    local plat = plateau
    if rc_desc then plat = cutf end
    local share
    if t < wait then
      local frac = math.min(1, t / regrow_s)
      share = plat - (plat - cutf) * (1 - frac) ^ 3
    else
      share = plat + probe_gain * (t - wait) ^ 3
    end
    grown = math.max(grown, rc_top * share)
  end
  grown = math.min(max_rate, grown)
  if grown >= nominal then rc_top = 0 end
  return grown
end

-- A rolling change of tps: the lowest configured rate asked with in the last recent_us wins
-- (decision.py, _agree); a caller with a higher one paces by it, its ceiling scaled alike.
local asking = process_id ~= '' and not leaving
-- A process's entry among the key's processes carries its daily reset and limit
-- (decision.py, process_entry): the key keeps to the lowest limit of those that asked in the
-- last recent_us, and to the window of a reset one of them counts under.
local entry = process_id .. '~' .. int(reset_offset)
if day_limit >= 0 then entry = entry .. '|' .. int(day_limit) end
if process_id ~= '' and leaving then
  -- Its daily limit leaves with it (a tpd raised for the next run), and day_cap's unless
  -- an older broker asked with it since (decision.py).
  local last = tonumber(redis.call('ZSCORE', KEYS[2], entry))
  redis.call('ZREM', KEYS[2], entry)
  if day_limit >= 0 and day_limit == day_cap and last and day_cap_seen <= last then
    day_cap_seen = 0
  end
end
local lost = rate <= 0
if lost then
  -- Named by when and by whom: two losses never get one name.
  gen, gen_sends, gen_unparked = int(now) .. ':' .. process_id, 0, false
end
-- decision.py: a record without a generation (an older broker's) takes no mark for one
-- from before a loss.
local before = process_id ~= '' and gen ~= '' and mark_gen ~= gen
local mine = nominal
if stored_nominal <= 0 or (asking and (mine < stored_nominal
    or (now - nominal_seen > recent_us and mine ~= stored_nominal))) then
  stored_nominal = mine
  rate = mine
end
if stored_nominal == mine then
  if asking then nominal_seen = now end
else
  min_rate = math.min(min_rate, stored_nominal)
  max_rate = max_rate * stored_nominal / mine
  nominal = stored_nominal
end
-- A rolling change of tpd: the lowest daily limit of the processes that asked in the last
-- recent_us holds for every caller (decision.py, _agree_day); day_limit -1 is unlimited.
-- day_cap is still written, for older brokers sharing the key (they read only it), and
-- read below while one asked with it in that minute.
if asking and day_limit >= 0 then
  if day_cap < 0 or day_limit < day_cap
      or (now - day_cap_seen > recent_us and day_limit ~= day_cap) then
    day_cap = day_limit
  end
  if day_limit == day_cap then day_cap_seen = now end
end
-- A view (broker status) takes the limit of the processes using the key, and its own only
-- when none asked in that minute (decision.py, _agree_day).
local own_limit = day_limit
local live = false
-- Another live process counts the day under the reset it was counted under (decision.py,
-- _held_by_another).
local held_by_another = false
if view then day_limit = -1 end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now - recent_us, '+inf')) do
  live = true
  local cap = tonumber(string.match(member, '|(%d+)$'))
  if cap and (day_limit < 0 or cap < day_limit) then day_limit = cap end
  local who, reset = string.match(string.match(member, '^[^|]*'), '^(.*)~(%d+)$')
  if who and who ~= process_id and tonumber(reset) == day_offset then
    held_by_another = true
  end
end
-- An older broker keeps its limit in day_cap alone (decision.py, _agree_day).
if day_cap >= 0 and now - day_cap_seen <= recent_us then
  live = true
  if day_limit < 0 or day_cap < day_limit then day_limit = day_cap end
end
if view and not live then day_limit = own_limit end
-- A lost hash (Redis restarted empty, flushed; a rate is never stored as 0): rebuilt from
-- what the caller saw last (decision.py: ProcessMark), the day's count below.
if lost and process_id ~= '' and mark_rate > 0 then rate = mark_rate end
-- Parked before the loss (Amazon's day spent): a probe since would have lifted it.
if before and not gen_unparked and mark_parked > math.max(now, parked_until) then
  parked_until = mark_parked
  park_why = mark_park_reason
end
if rate <= 0 then rate = nominal end
rate = math.min(max_rate, math.max(min_rate, rate))
-- Another live process counts the day under another reset: its window holds for this
-- caller too (decision.py: decide).
local other_reset = day >= 0 and day_offset >= 0 and day_offset ~= reset_offset
local kept = other_reset and held_by_another
-- The day counted, as this caller's window holding its start (decision.py: decide): under
-- another reset it ends at this caller's next reset after its start; the record keeps the
-- offset it was counted under.
local counted = day
local taken_over = -1
if other_reset then
  counted = math.floor((day * 86400 + day_offset - reset_offset) / 86400)
end
-- decision.py (_new_day): begin window `d`; the last one's counts go.
local function new_day(d)
  day = d
  count = 0
  gen_sends = 0
  prior = {}
  own = {}
end
local window_end
if kept then
  local held = math.floor((math.floor(now / 1000000) - day_offset) / 86400)
  if held > day then
    new_day(held)
    counted = math.floor((day * 86400 + day_offset - reset_offset) / 86400)
  end
  window_end = ((day + 1) * 86400 + day_offset) * 1000000
else
  local today = math.floor((math.floor(now / 1000000) - reset_offset) / 86400)
  if today > counted then
    -- decision.py: a new day over one counted under another reset is said
    if other_reset then
      taken_over = day_offset
    end
    counted = today
    new_day(today)
    day_offset = reset_offset
  end
  window_end = ((counted + 1) * 86400 + reset_offset) * 1000000
end
if process_id ~= '' then
  -- A mark from before the loss knew nothing of the sends granted since: they come on top.
  if hwm_day == counted then
    local seen = hwm_count
    if before then seen = seen + gen_sends end
    if before and mark_gen ~= '' then
      -- decision.py (_tell_prior): the sends of the mark's generation join the others'.
      if mark_gen_sends > (prior[mark_gen] or 0) then
        keep_most(prior, mark_gen, mark_gen_sends, prior_keep)
      end
      local told = gen_sends
      for _, sends in pairs(prior) do told = told + sends end
      if told > seen then seen = told end
    end
    if mark_own_sends > (own[process_id] or 0) then
      -- decision.py: what this process was granted today, as it saw it
      keep_most(own, process_id, mark_own_sends, own_keep)
      local total = 0
      for _, sends in pairs(own) do total = total + sends end
      if total > seen then seen = total end
    end
    if seen > count then count = seen end
  end
  if asking then redis.call('ZADD', KEYS[2], now, entry) end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. int(now - 600000000))
  redis.call('PEXPIRE', KEYS[2], ttl_ms)
end

-- feedback
local cut = 0
if set_rate > 0 then rate = math.min(max_rate, math.max(min_rate, set_rate)) end
for _ = 1, successes do
  if tuned then
    rate = recovered_rate(rate, increase * boost)
  else
    rate = math.min(max_rate, rate * math.exp(increase * boost))
  end
  streak = streak + 1
  if streak % boost_every == 0 then boost = math.min(max_boost, boost * 2) end
end
if answered then
  run_429s = 0
  answered_at = now  -- Redis's TIME is the wall clock
  -- Amazon answered since the record started afresh: a park from before is over.
  gen_unparked = true
end
if run_in > 0 then
  if now - last_429 > run_gap then run_429s = 0 end
  run_429s = run_429s + run_in
end
-- decision.py: past a run of run_cuts_from 429s with no success, every 429 cuts; judged
-- per 429 (the i-th reported is the run's (run - (#ARGV - i))-th).
for i = first_throttled, #ARGV do
  streak = 0
  boost = 1
  last_429 = now
  if tonumber(ARGV[i]) > cut_at or run_429s - (#ARGV - i) >= run_cuts_from then
    if tuned then
      rate = math.max(min_rate, cut_rate(rate))
    else
      rate = math.max(min_rate, rate * (1 - beta))
    end
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
    rc_top, rc_level, rc_desc, rc_r1, rc_r2 = 0, 1, false, 0, 0
    boost = 1
    streak = 0
    gen_unparked = true
  end
  parked_until = 0
  park_why = ''
  probing_until = 0
end
if release_probe > 0 and probing_until == release_probe then
  probing_until = now + probe_again
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
    refusal, wait = 'daily quota', window_end - now
  elseif candidate - now > horizon then
    refusal, wait = 'horizon', candidate - now - horizon
  else
    granted = 1
    slot = candidate
    wait = math.max(0, slot - now)
    next_slot = slot + interval
    count = count + 1
    gen_sends = gen_sends + 1
    if process_id ~= '' then keep_most(own, process_id, (own[process_id] or 0) + 1, own_keep) end
    if parked_until > 0 then
      probe = 1
      probing_until = now + lease
    end
  end
end

if not view then
  redis.call('HSET', KEYS[1], 'rate', num(rate), 'nominal', num(stored_nominal),
    'next_slot', int(next_slot), 'cut_at', int(cut_at), 'cuts', int(cuts), 'boost', num(boost),
    'streak', int(streak), 'day', int(day), 'count', int(count),
    'paused_until', int(paused_until), 'pause_reason', pause_why,
    'parked_until', int(parked_until), 'park_reason', park_why,
    'probing_until', int(probing_until), 'last_429', int(last_429), 'rc_top', num(rc_top),
    'rc_level', num(rc_level), 'rc_desc', rc_desc and '1' or '0', 'rc_r1', int(rc_r1),
    'rc_r2', int(rc_r2), 'nominal_seen', int(nominal_seen), 'day_cap', int(day_cap),
    'day_cap_seen', int(day_cap_seen), 'run_429s', int(run_429s), 'gen', gen,
    'gen_sends', int(gen_sends), 'gen_unparked', gen_unparked and '1' or '0',
    'day_offset', int(day_offset), 'prior', cjson.encode(prior), 'own', cjson.encode(own),
    'answered_at', int(answered_at))
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
end
-- Processes, not entries: one process enters once per daily limit it keeps (two [[keys]]
-- entries of one credential, each with its tpd); its id is what precedes '~' or '|'. Only
-- broker status reads the figure: a send gets the entries' count, without a second scan.
local processes = 0
if view then
  local counted_ids = {}
  for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now - recent_us, '+inf')) do
    local id = string.match(entry, '^[^~|]*')
    if not counted_ids[id] then
      counted_ids[id] = true
      processes = processes + 1
    end
  end
else
  processes = redis.call('ZCOUNT', KEYS[2], now - recent_us, '+inf')
end

-- decision.py (_day_start): when the day counted began, under the reset it was counted under
local day_start = window_end - 86400000000
if day >= 0 and day_offset >= 0 then day_start = (day * 86400 + day_offset) * 1000000 end
if paused_until <= now then pause_why = '' end
return {granted, int(wait), refusal, probe, int(now), int(slot),
  int(math.max(next_slot, paused_until)), num(rate), int(counted), int(count),
  int(paused_until > now and paused_until or 0), pause_why, int(parked_until), park_why,
  int(last_429), cut, processes, int(day_limit),
  int((now - last_429 <= run_gap) and run_429s or 0), gen, int(window_end), int(gen_sends),
  int(taken_over), (answered_at > 0 and answered_at >= day_start) and 1 or 0}
