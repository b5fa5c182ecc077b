-- Argo CD health check for kubetune.io/LoRAAdapter.
-- Healthy: Ready=True for the current generation (loaded on every replica, rolled out, or
-- superseded by a newer version of its alias). Degraded: Degraded=True (corrupt artifact,
-- incompatible, replicas failing, merged rollout rolled back). Otherwise Progressing.
local hs = {}
if obj.status == nil or obj.status.observedGeneration == nil or
    obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe this generation"
  return hs
end
local ready = nil
local degraded = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then ready = c end
    if c.type == "Degraded" then degraded = c end
  end
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.reason .. ": " .. (degraded.message or "")
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.reason .. ((obj.status.loadedReplicas ~= nil) and
    (" (" .. obj.status.loadedReplicas .. " replicas)") or "")
else
  hs.status = "Progressing"
  if ready ~= nil then
    hs.message = ready.reason .. ": " .. (ready.message or "")
  else
    hs.message = "Waiting for verification"
  end
end
return hs
