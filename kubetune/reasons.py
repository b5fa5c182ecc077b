"""Condition types and reasons of our kinds, each with one line of meaning and its kind:

* ``ok``        the condition holds as it should;
* ``progress``  expected on the way (not yet promoted, rolling out): a Normal Event;
* ``transient`` something is wrong that may mend itself (storage down, a replica restarting):
                the operator keeps what is served and looks again; a Warning Event;
* ``terminal``  wrong until someone changes the spec or the artifact: ``Degraded=True`` and a
                Warning Event.

The operator decides by the kind, never by sniffing text, and an unknown reason counts as
terminal. Tooling (kstatus, Argo CD health checks, alerts) can rely on the names below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["ok", "progress", "transient", "terminal"]


@dataclass(frozen=True)
class Reason:
    name: str
    kind: Kind
    doc: str


REASONS: dict[str, Reason] = {}


def _r(name: str, kind: Kind, doc: str) -> str:
    assert name not in REASONS, name
    REASONS[name] = Reason(name, kind, doc)
    return name


def kind(name: str) -> Kind:
    """The kind of a reason; anything unregistered is terminal (never silently ignored)."""
    found = REASONS.get(name)
    return found.kind if found else "terminal"


def degrades(name: str) -> bool:
    return kind(name) == "terminal"


def warns(name: str) -> bool:
    return kind(name) in ("transient", "terminal")


# ---- LoRAAdapter condition types --------------------------------------------------------------
ARTIFACT_VERIFIED = "ArtifactVerified"  # the manifest and every file digest check out
COMPATIBLE = "Compatible"  # base model, rank and method fit the target
PROMOTED = "Promoted"  # every promotion gate holds
LOADED = "Loaded"  # hot-swapped and behaviour-verified on every desired replica
ROLLED_OUT = "RolledOut"  # merged mode: the Deployment serves the merged model
READY = "Ready"  # what the adapter is for is done
DEGRADED = "Degraded"  # a terminal problem needs a person
# kstatus' word for Degraded (Flux's health checks, `kubectl wait`, cli-utils): Stalled=True is
# "Failed", so a Kustomization with `wait: true` reports it at once instead of timing out.
STALLED = "Stalled"
LORAADAPTER_CONDITIONS = (ARTIFACT_VERIFIED, COMPATIBLE, PROMOTED, LOADED, ROLLED_OUT, READY,
                          DEGRADED, STALLED)

# ---- LoRAAdapter reasons ------------------------------------------------------------------
INVALID_SPEC = _r("InvalidSpec", "terminal", "the spec fails validation; the message names the "
                  "field")
AS_EXPECTED = _r("AsExpected", "ok", "Degraded=False: nothing needs a person")
# the artifact
PENDING = _r("Pending", "progress", "not looked at yet")
SOURCE_NOT_READY = _r("SourceNotReady", "transient", "the source FineTuneJob has not "
                      "published an artifact yet")
STORAGE_ERROR = _r("StorageError", "transient", "S3 did not answer or refused (credentials, "
                   "network); what is served stays")
POLICY_DENIED = _r("PolicyDenied", "terminal", "the operator's policy forbids the S3 endpoint")
MANIFEST_MISSING = _r("ManifestMissing", "terminal", "no manifest.json: an incomplete upload "
                      "or not a kubetune artifact")
MANIFEST_INVALID = _r("ManifestInvalid", "terminal", "manifest.json is malformed or too large")
ARTIFACT_INCOMPLETE = _r("ArtifactIncomplete", "terminal", "a file the manifest lists is "
                         "missing")
ARTIFACT_TOO_LARGE = _r("ArtifactTooLarge", "terminal", "the files exceed the size limit")
DIGEST_MISMATCH = _r("DigestMismatch", "terminal", "a size or sha256 differs from the "
                     "manifest, or the manifest from the pinned digest")
UNSAFE_PATH = _r("UnsafePath", "terminal", "a file name would escape its folder")
VERIFIED = _r("Verified", "ok", "every file digest matches the manifest")
ARTIFACT_NOT_VERIFIED = _r("ArtifactNotVerified", "progress", "later conditions wait for the "
                           "artifact check")
# compatibility
COMPATIBLE_OK = _r("Compatible", "ok", "base model, rank and method fit the target")
BASE_MODEL_MISMATCH = _r("BaseModelMismatch", "terminal", "trained on another base model or "
                         "revision than the spec (or the server) names")
RANK_TOO_HIGH = _r("RankTooHigh", "terminal", "the LoRA rank exceeds spec.compatibility."
                   "maxRank")
METHOD_NOT_SERVABLE = _r("MethodNotServable", "terminal", "the runtime cannot hot-swap this "
                         "method")
METHOD_NOT_MERGEABLE = _r("MethodNotMergeable", "terminal", "this method cannot be merged into "
                          "the base model")
INCOMPATIBLE = _r("Incompatible", "terminal", "enforced compatibility failed: nothing is loaded")
# promotion
PROMOTED_OK = _r("Promoted", "ok", "every promotion gate holds")
GATES_PENDING = _r("GatesPending", "progress", "a promotion gate is not True yet")
PROMOTION_PENDING = _r("PromotionPending", "progress", "not loaded until promoted")
NO_TARGET = _r("NoTarget", "progress", "no spec.target: verified only")
# the target and its replicas
TARGET_NOT_FOUND = _r("TargetNotFound", "transient", "the target Deployment does not exist "
                      "(yet)")
TARGET_NOT_OPTED_IN = _r("TargetNotOptedIn", "terminal", "the Deployment lacks the opt-in "
                         "label the operator's policy requires")
API_KEY_SECRET_MISSING = _r("ApiKeySecretMissing", "transient", "spec.target.apiKeySecret "
                            "does not exist (yet)")
NO_READY_REPLICAS = _r("NoReadyReplicas", "transient", "the target has no ready serving pod")
NOT_LOADED = _r("NotLoaded", "transient", "no replica serves it yet")
PARTIALLY_LOADED = _r("PartiallyLoaded", "transient", "some replicas serve it, others not yet")
ALL_REPLICAS = _r("AllReplicas", "ok", "every desired replica serves it and reproduces its "
                  "probe")
LOADING = _r("Loading", "transient", "Ready=False while replicas are loaded")
LOADED_OK = _r("Loaded", "ok", "Ready: loaded on every desired replica")
REPLICAS_FAILED = _r("ReplicasFailed", "terminal", "Degraded: a replica refused or failed the "
                     "adapter (see status.failures)")
SERVING = _r("Serving", "ok", "the newest promoted version of its alias")
NOT_PROMOTED = _r("NotPromoted", "progress", "unloaded: not promoted")
SUPERSEDED = _r("Superseded", "progress", "a newer promoted version of the alias is Ready")
HANDING_OVER = _r("HandingOver", "progress", "stays loaded until its successor is Ready on "
                  "every replica (make-before-break)")
DELETING = _r("Deleting", "progress", "being deleted: unloading everywhere first")
UNLOADING = _r("Unloading", "progress", "being unloaded from replicas")
# replica failures (status.failures[].reason, from the serving API)
UNREACHABLE = _r("Unreachable", "transient", "the replica's API did not answer in time")
BAD_RESPONSE = _r("BadResponse", "terminal", "the replica answered something that is not its "
                  "API")
LOAD_REJECTED = _r("LoadRejected", "terminal", "the replica refused the load (its message says "
                   "why)")
SYNC_FAILED = _r("SyncFailed", "transient", "the vLLM sync sidecar could not fetch the files")
TIMEOUT = _r("Timeout", "transient", "the replica did not answer within the call's total "
             "deadline")
UNAUTHORIZED = _r("Unauthorized", "terminal", "the replica refused the API key "
                  "(spec.target.apiKeySecret)")
INSUFFICIENT_STORAGE = _r("InsufficientStorage", "transient", "the replica's adapter cache is "
                          "full")
BEHAVIOUR_MISMATCH = _r("BehaviourMismatch", "terminal", "the replica lists the adapter but its "
                        "answer to the manifest's probe prompt is not the trained model's")
# merged mode
MERGED_MODE = _r("MergedMode", "progress", "Loaded=False: merged into the base, nothing is "
                 "hot-swapped")
MERGING = _r("Merging", "progress", "the merge Job runs")
ROLLING_OUT = _r("RollingOut", "transient", "the Deployment rolls out the merged model")
ROLLED_OUT_OK = _r("RolledOut", "ok", "the Deployment serves the merged model")
MERGE_FAILED = _r("MergeFailed", "terminal", "the merge Job failed")
ROLLOUT_FAILED = _r("RolloutFailed", "terminal", "the rollout did not progress")
ROLLED_BACK = _r("RolledBack", "terminal", "the rollout failed and the previous revision was "
                 "restored")
TARGET_IN_USE = _r("TargetInUse", "terminal", "another adapter holds the Deployment")

# Events about replicas (not condition reasons).
LOADED_ON_REPLICA = _r("LoadedOnReplica", "ok", "Event: loaded on one pod")
UNLOADED_FROM_REPLICA = _r("UnloadedFromReplica", "ok", "Event: unloaded from one pod")
BEHAVIOUR_VERIFIED = _r("BehaviourVerified", "ok", "Event: a replica answers the probe like the "
                        "trained adapter")
RESTORED = _r("Restored", "ok", "Event: the Deployment is back on the model it served before")
LOAD_FAILED = _r("LoadFailed", "terminal", "Event: one pod failed a load")
