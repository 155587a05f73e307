-- wrk script: durable appends at a bounded rate, for measuring reads beside writes.
-- Each request appends one event (a fresh UUID) to stream scratch-load-<thread>-<n mod 64>.
-- The rate: every connection waits CONTIMG_LOAD_DELAY_MS (default 10) between requests,
-- so C connections ask for at most C * 1000 / delay appends a second.
local delay_ms = tonumber(os.getenv("CONTIMG_LOAD_DELAY_MS") or "10")
local counter = 0
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))

local function uuid()
  local t = "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx"
  return (t:gsub("[xy]", function(c)
    local v = (c == "x") and math.random(0, 15) or math.random(8, 11)
    return string.format("%x", v)
  end))
end

function delay()
  return delay_ms
end

function request()
  counter = counter + 1
  local body = string.format('[{"eventId":"%s","eventType":"Noted","data":{"n":%d}}]', uuid(), counter)
  local path = string.format("/api/streams/scratch-load-%d", counter % 64)
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end
