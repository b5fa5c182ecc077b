"""End to end on the real control plane: kubectl apply a FineTuneJob → the real trainer runs in
a trainer pod on the real node → verified artifact → LoRAAdapter (held by the job's evaluation
gate until EvalPassed) → loaded on both replicas of a `kubetune serve` Deployment → a completion
naming the adapter differs from the base model's."""

from __future__ import annotations

import time

import pytest
import yaml

from servingutil import (REAL_NODE, complete, condition, create_deployment, models,
                         serve_deployment, wait_condition, wait_ready)

pytestmark = [pytest.mark.cluster, pytest.mark.trainer, pytest.mark.e2e]


def test_finetunejob_to_adapter_served_on_two_replicas(cluster, operator, job_namespace,
                                                       s3_server):
    ns = job_namespace
    create_deployment(cluster, ns, serve_deployment("chat", 2, endpoint=s3_server.endpoint))
    job = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "colors"},
        "spec": {
            "baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
            "dataset": {"train": {"uri": "builtin://tiny-chat"}, "format": "messages",
                        "maxLength": 128, "evalFraction": 0.1},
            "method": {"type": "LoRA", "lora": {"r": 8}},
            "training": {"maxSteps": 30, "learningRate": 0.01, "perDeviceBatchSize": 8,
                         "gradientAccumulationSteps": 1, "loggingSteps": 5},
            "resources": {"gpusPerNode": 1, "nodeSelector": REAL_NODE},
            "output": {"uri": f"s3://{s3_server.bucket}/e2e/colors-{int(time.time())}",
                       "createAdapter": {"name": "{job}-v1", "servingName": "colors",
                                         "alias": "colors", "stage": "production",
                                         "target": {"deployment": "chat"},
                                         "promotion": {"requires": [
                                             {"conditionType": "EvalPassed"}]}}},
            "evaluationGate": {"maxEvalLoss": 50.0}}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(job))
    pods = wait_ready(cluster, ns, "chat", 2)
    base = {p["name"]: complete(p["ip"], "base") for p in pods}

    ready = wait_condition(cluster, ns, "colors-v1", "Ready", timeout=420, op=operator)
    assert ready["status"]["replicas"] == {"desired": 2, "loaded": 2, "failed": 0}
    assert condition(ready, "Promoted")["status"] == "True"
    ftj = cluster.kubectl("get", "finetunejob", "colors", "-n", ns, "-o", "yaml").stdout
    ftj = yaml.safe_load(ftj)
    eval_passed = next(c for c in ftj["status"]["conditions"] if c["type"] == "EvalPassed")
    assert eval_passed["status"] == "True" and "maxEvalLoss" in eval_passed["message"]
    assert ready["spec"]["source"]["sha256"] == ftj["status"]["artifact"]["manifestSha256"]
    for pod in pods:
        assert "colors" in models(pod["ip"])
        tuned = complete(pod["ip"], "colors")
        assert tuned != base[pod["name"]], f"{pod['name']}: adapter output equals the base's"
    table = cluster.kubectl("get", "loraadapters", "-n", ns).stdout
    assert "colors-v1" in table and "2/2" in table
