-- Argo CD health check for kubetune.io/FineTuneJob.
-- Status is trusted only when it describes the current spec (observedGeneration).
local hs = {}
if obj.status == nil or obj.status.observedGeneration == nil or
    obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe this generation"
  return hs
end
local ready = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then ready = c end
  end
end
local phase = obj.status.phase
local message = ""
if ready ~= nil and ready.message ~= nil then message = ready.message end
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" or phase == "Queued" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
hs.message = (phase or "Pending") .. (message ~= "" and (": " .. message) or "")
return hs
