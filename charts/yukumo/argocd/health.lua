-- Argo CD health check for every yukumo.io kind (VirtualCluster,
-- NetworkGroup, Volume, Site, VirtualNode, Host), from their kstatus
-- conditions: Stalled=True is Degraded (a bad spec, a failed image, a
-- refused quota: someone must act), Ready=True is Healthy (including a
-- reservation waiting for its window, which says when it starts, and a
-- stopped cluster), anything else is Progressing with its reason (a
-- capacity wait, nodes starting, a status not yet written for the
-- current generation). Hosts and Sites have no Stalled/Reconciling
-- conditions: Ready=False is Degraded for them (a host lost, a Site with
-- no Ready host); a VirtualNode's phase says Failed or Stopped as asked.
-- Runs on Lua 5.1 (Argo CD's gopher-lua).
local hs = {}
local function condition(t)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == t then
        return c
      end
    end
  end
  return nil
end
local function say(c)
  local m = c.message or ""
  if m == "" then
    return c.reason or ""
  end
  return (c.reason or "") .. ": " .. m
end
if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "waiting for a status"
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "waiting for generation " .. generation .. " to be observed (at " .. observed .. ")"
  return hs
end
local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = say(stalled)
  return hs
end
local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = say(ready)
  return hs
end
-- A VirtualNode says what its agent did in its phase (it has no
-- Stalled condition): failed is Degraded, powered off as asked is done.
if obj.kind == "VirtualNode" and ready ~= nil then
  if obj.status.phase == "Failed" then
    hs.status = "Degraded"
    hs.message = say(ready)
    return hs
  end
  if obj.status.phase == "Stopped" and obj.spec ~= nil and obj.spec.running == false then
    hs.status = "Healthy"
    hs.message = say(ready)
    return hs
  end
end
if ready ~= nil and (obj.kind == "Host" or obj.kind == "Site") then
  hs.status = "Degraded"
  hs.message = say(ready)
  return hs
end
hs.status = "Progressing"
if ready ~= nil then
  hs.message = say(ready)
else
  hs.message = "waiting for a Ready condition"
end
return hs
