-- Runs an Argo CD health check the way Argo CD does: the object as the
-- global `obj`, the script's return value the health.
--   lua5.1 e2e/lib/argocd-health.lua SCRIPT OBJECT.json  →  "<status>\t<message>"
local cjson = require("cjson")
local function strip(v)
  if v == cjson.null then
    return nil
  end
  if type(v) == "table" then
    for k, x in pairs(v) do
      v[k] = strip(x)
    end
  end
  return v
end
local f = assert(io.open(arg[2]))
local obj = strip(cjson.decode(f:read("*a")))
f:close()
local check = assert(loadfile(arg[1]))
setfenv(check, setmetatable({ obj = obj }, { __index = _G }))
local hs = check()
io.write(hs.status, "\t", hs.message or "", "\n")
