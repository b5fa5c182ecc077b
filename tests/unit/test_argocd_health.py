"""The Argo CD health checks (Lua) run in a real Lua runtime (lupa) against statuses of the
shapes the operator writes; the argocd-cm snippet carries exactly these scripts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "integrations" / "argocd"


def health(kind: str, obj: dict) -> tuple[str, str]:
    from lupa import LuaRuntime

    lua = LuaRuntime(unpack_returned_tuples=True)
    script = (FOLDER / f"{kind.lower()}-health.lua").read_text()

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value
    fn = lua.eval(f"function(obj) {script} end")
    result = fn(to_lua(obj))
    return result["status"], result["message"]


def obj(generation=2, observed=2, phase=None, **conds) -> dict:
    status = {"observedGeneration": observed,
              "conditions": [{"type": k, "status": v[0], "reason": v[1], "message": "m"}
                             for k, v in conds.items()]}
    if phase:
        status["phase"] = phase
    return {"metadata": {"generation": generation}, "status": status}


@pytest.mark.parametrize("o,expected", [
    (obj(phase="Succeeded", Ready=("True", "Succeeded")), "Healthy"),
    (obj(phase="Failed", Ready=("False", "BackoffLimitExceeded")), "Degraded"),
    (obj(phase="Running", Ready=("False", "Running")), "Progressing"),
    (obj(phase="Suspended"), "Suspended"),
    (obj(observed=1, phase="Succeeded"), "Progressing"),  # status of an older spec
    ({"metadata": {"generation": 1}}, "Progressing"),
])
def test_finetunejob_health(o, expected):
    assert health("FineTuneJob", o)[0] == expected


@pytest.mark.parametrize("o,expected,reason", [
    (obj(Ready=("True", "Loaded"), Degraded=("False", "AsExpected")), "Healthy", "Loaded"),
    (obj(Ready=("True", "Superseded"), Degraded=("False", "AsExpected")), "Healthy",
     "Superseded"),
    (obj(Ready=("False", "Loading"), Degraded=("False", "AsExpected")), "Progressing",
     "Loading"),
    (obj(Ready=("False", "DigestMismatch"), Degraded=("True", "DigestMismatch")), "Degraded",
     "DigestMismatch"),
    (obj(Ready=("False", "RolledBack"), Degraded=("True", "RolledBack")), "Degraded",
     "RolledBack"),
    (obj(observed=1, Ready=("True", "Loaded")), "Progressing", "Waiting"),
])
def test_loraadapter_health(o, expected, reason):
    status, message = health("LoRAAdapter", o)
    assert status == expected and reason in message


def test_configmap_snippet_carries_the_scripts():
    cm = yaml.safe_load((FOLDER / "argocd-cm.yaml").read_text())
    for kind in ("FineTuneJob", "LoRAAdapter"):
        key = f"resource.customizations.health.kubetune.io_{kind}"
        assert cm["data"][key] == (FOLDER / f"{kind.lower()}-health.lua").read_text()
