"""Write `crds/*.yaml`, `docs/api.md`, the Helm chart's CRD template and the Argo CD
health-check ConfigMap from the API models and the Lua scripts.

    python -m kubetune.api.generate [ROOT]      # ROOT defaults to the repository root
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from . import runtime, trainerstatus
from .crd import KINDS, crd

HEADER = "# Generated from kubetune/api by `python -m kubetune.api.generate`. Do not edit.\n"


def crd_files() -> dict[str, str]:
    files = {}
    for kind, info in KINDS.items():
        files[f"crds/{info['plural']}.kubetune.io.yaml"] = HEADER + yaml.safe_dump(
            crd(kind), sort_keys=False, width=100)
    files[f"crds/{trainerstatus.NAME}.yaml"] = HEADER + \
        "# Who may write a FineTuneJob's status (kubetune/api/trainerstatus.py).\n" + \
        yaml.safe_dump_all(trainerstatus.manifests(), sort_keys=False, width=100)
    files[f"crds/{runtime.ADMISSION_NAME}.yaml"] = HEADER + \
        "# Fields a FineTuneJob may not set under its runtime (kubetune/api/runtime.py).\n" + \
        yaml.safe_dump_all(runtime.admission(), sort_keys=False, width=100)
    return files


def _type(node: dict) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = node.get("type", "object")
    if kind == "array":
        return f"[]{_type(node['items'])}"
    if kind == "object" and "additionalProperties" in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    return kind


def _bounds(node: dict) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    if "minimum" in node:
        parts.append(f"{'>' if node.get('exclusiveMinimum') else '≥'} {node['minimum']}")
    if "maximum" in node:
        parts.append(f"{'<' if node.get('exclusiveMaximum') else '≤'} {node['maximum']}")
    for key, label in (("minLength", "min length"), ("maxLength", "max length"),
                       ("minItems", "min items"), ("maxItems", "max items"),
                       ("maxProperties", "max entries")):
        if key in node:
            parts.append(f"{label} {node[key]}")
    if "pattern" in node and len(node["pattern"]) <= 60:
        parts.append(f"pattern `{node['pattern']}`")
    elif "pattern" in node:
        parts.append("pattern (see CRD)")
    return "; ".join(parts)


def _rows(node: dict, path: str, required: bool, rows: list, rules: list) -> None:
    default = node.get("default")
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    rows.append(f"| `{path}` | {_type(node)} | {'yes' if required else ''} | "
                f"{'' if default is None else cell(f'`{json.dumps(default)}`')} | "
                f"{cell(_bounds(node))} | {cell(node.get('description', ''))} |")
    for rule in node.get("x-kubernetes-validations", []):
        rules.append(f"- `{path}`: {rule['message']} (CEL: `{rule['rule']}`)")
    child = node
    suffix = ""
    if node.get("type") == "array":
        child, suffix = node["items"], "[]"
        for rule in child.get("x-kubernetes-validations", []):
            rules.append(f"- `{path}[]`: {rule['message']} (CEL: `{rule['rule']}`)")
    for name, prop in (child.get("properties") or {}).items():
        _rows(prop, f"{path}{suffix}.{name}", name in (child.get("required") or []), rows, rules)


def api_markdown() -> str:
    out = ["<!-- Generated from kubetune/api by `python -m kubetune.api.generate`. Do not edit. -->",
           "# API reference: kubetune.io/v1alpha1", "",
           "Every field of the two kinds, as the apiserver enforces it (the CRDs in `crds/` are "
           "rendered from the same pydantic models). Admission rejects a value outside its "
           "bounds, an unknown field, or a broken rule below, with a message naming the field.",
           ""]
    for kind, info in KINDS.items():
        schema = crd(kind, documented=True)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        names = crd(kind)["spec"]["names"]
        out += [f"## {kind}", "",
                f"Short name `{names['shortNames'][0]}`, category `kubetune`, "
                f"{'cluster-scoped' if info.get('scope') == 'Cluster' else 'namespaced'}. "
                f"{schema['description']}", ""]
        for part in ("spec", "status"):
            rows: list[str] = []
            rules: list[str] = []
            _rows(schema["properties"][part], part, part == "spec", rows, rules)
            out += [f"### {kind}.{part}", "",
                    "| field | type | required | default | bounds | description |",
                    "|---|---|---|---|---|---|", *rows, ""]
            if rules:
                out += ["Rules:", "", *rules, ""]
        for rule in schema.get("x-kubernetes-validations", []):
            out.append(f"- on update: {rule['message']} (CEL: `{rule['rule']}`)")
        out.append("")
    from kubetune import reasons

    out += ["## LoRAAdapter condition reasons", "",
            "From `kubetune/reasons.py`: the operator decides by a reason's kind (`terminal` sets "
            "`Degraded=True`; `transient` keeps what is served and looks again; both are Warning "
            "Events), never by its message.", "",
            "| reason | kind | meaning |", "|---|---|---|"]
    out += [f"| `{r.name}` | {r.kind} | {r.doc} |" for r in reasons.REASONS.values()]
    return "\n".join(out).rstrip() + "\n"


ROOT = Path(__file__).resolve().parents[2]


def chart_crds() -> str:
    """The CRDs as a chart template: installed when crds.enabled, kept on uninstall (and
    never deleted by an upgrade that disables them) when crds.keep."""
    out = ["{{- /* " + HEADER.strip().lstrip("# ") + " */ -}}", "{{- if .Values.crds.enabled }}"]
    for kind in KINDS:
        body = crd(kind)
        spec = yaml.safe_dump({"spec": body["spec"]}, sort_keys=False, width=100)
        out += ["---", f"apiVersion: {body['apiVersion']}", f"kind: {body['kind']}",
                "metadata:", f"  name: {body['metadata']['name']}",
                "  labels:", "    {{- include \"kubetune.labels\" . | nindent 4 }}",
                "  {{- if .Values.crds.keep }}", "  annotations:",
                "    helm.sh/resource-policy: keep", "  {{- end }}", spec.rstrip("\n")]
    # The trainer-status policy, kept with the CRDs (the namespaces' trainer RoleBindings
    # stay too); the operator's own ServiceAccount is left alone by it.
    operator_sa = ("['system:serviceaccount:{{ .Release.Namespace }}:"
                   "{{ include \"kubetune.serviceAccountName\" . }}']")
    for body in trainerstatus.manifests(operator_sa) + runtime.admission():
        rest = yaml.safe_dump({k: v for k, v in body.items()
                               if k not in ("apiVersion", "kind", "metadata")},
                              sort_keys=False, width=200)
        out += ["---", f"apiVersion: {body['apiVersion']}", f"kind: {body['kind']}",
                "metadata:", f"  name: {body['metadata']['name']}",
                "  labels:", "    {{- include \"kubetune.labels\" . | nindent 4 }}",
                "  {{- if .Values.crds.keep }}", "  annotations:",
                "    helm.sh/resource-policy: keep", "  {{- end }}", rest.rstrip("\n")]
    out.append("{{- end }}")
    return "\n".join(out) + "\n"


def argocd_configmap() -> str:
    folder = ROOT / "integrations" / "argocd"
    data = {f"resource.customizations.health.kubetune.io_{kind}":
            (folder / f"{kind.lower()}-health.lua").read_text() for kind, info in KINDS.items()
            if info.get("health", True)}
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "argocd-cm", "namespace": "argocd",
                         "labels": {"app.kubernetes.io/part-of": "argocd"}},
            "data": data}
    return HEADER + "# Merge into your argocd-cm (kubectl apply would replace other keys).\n" + \
        yaml.safe_dump(body, sort_keys=False, width=100, default_style=None)


def all_files() -> dict[str, str]:
    return {**crd_files(), "docs/api.md": api_markdown(),
            "charts/kubetune/templates/crds.yaml": chart_crds(),
            "integrations/argocd/argocd-cm.yaml": argocd_configmap()}


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[2]
    for rel, text in all_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
