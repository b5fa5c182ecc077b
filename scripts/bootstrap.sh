#!/usr/bin/env bash
# Prepare this machine for kubetune: a cached virtual environment with every Python dependency
# (operator, trainer and test extras) and the dev cluster's Go-built binaries. Idempotent: on a
# machine that already has them it only re-links this checkout into the venv (seconds).
# Prints the venv's path on stdout (last line); progress goes to stderr.
# --python-only: only the venv (no Go toolchain needed, no dev-cluster binaries): `kubetune run`,
# `kubetune compare` and `kubetune serve` need nothing else.
set -euo pipefail
python_only=0
[ "${1:-}" = "--python-only" ] && python_only=1
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KUBETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
python="${PYTHON:-python3}"

command -v "$python" >/dev/null || { echo "error: $python not found (Python >= 3.11 needed)" >&2; exit 2; }
[ "$python_only" = 1 ] || command -v go >/dev/null || { echo "error: the Go toolchain is missing (Go >= 1.25 builds the dev cluster)" >&2; exit 2; }

extras="${KUBETUNE_EXTRAS:-operator,trainer,dev}"
# The venv is keyed by the dependency lists and the interpreter, so a change of either makes a new one.
key="$("$python" - "$here/pyproject.toml" "$extras" <<'PY'
import hashlib, sys, tomllib, platform
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = sorted(sys.argv[2].split(","))
deps = sorted(p["dependencies"]) + [f"{e}:{d}" for e in extras for d in sorted(p["optional-dependencies"][e])]
deps += [f"no-deps:{d}" for d in sorted(tomllib.load(open(sys.argv[1], "rb")).get("tool", {}).get("kubetune", {}).get("no-deps", {}).get("trainer", []))]
print(hashlib.sha256(("\n".join(deps) + platform.python_version()).encode()).hexdigest()[:12])
PY
)"
venv="$cache/venv-$key"
mkdir -p "$cache"
if [ ! -f "$venv/.kubetune-installed" ]; then
  echo "Creating the Python environment $venv (first time on this machine; torch alone is ~3 GB)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  # Every wheel is downloaded once into $cache/wheels and installed from there: the package
  # registry here sends no cache headers, so pip's own cache keeps nothing, and the images'
  # wheelhouse (kubetune/devcluster/images.py) links the same files instead of downloading
  # torch a second time.
  wheels="$cache/wheels"
  requirements="$(mktemp)"; trap 'rm -f "$requirements"' EXIT
  (cd "$here" && "$python" docker/deps.py "$extras") > "$requirements"
  echo "setuptools>=69" >> "$requirements"; echo "wheel" >> "$requirements"  # builds our own wheel
  "$venv/bin/pip" download --progress-bar off -d "$wheels" -r "$requirements" -c "$here/constraints.txt" >&2
  "$venv/bin/pip" install --progress-bar off --no-index --find-links "$wheels" -r "$requirements" -c "$here/constraints.txt" >&2
  # Data wheels ([tool.kubetune.no-deps] in pyproject.toml): no dependency resolution.
  nodeps="$(cd "$here" && "$python" docker/deps.py "$extras" --no-deps)"
  if [ -n "$nodeps" ]; then
    "$venv/bin/pip" download --progress-bar off --no-deps -d "$wheels" $nodeps >&2
    "$venv/bin/pip" install --progress-bar off --no-index --find-links "$wheels" --no-deps $nodeps >&2
  fi
  touch "$venv/.kubetune-installed"
  # Keep the two newest environments (each holds torch, ~5 GB); drop older ones.
  ls -1dt "$cache"/venv-* 2>/dev/null | tail -n +3 | while read -r old; do
    [ "$old" != "$venv" ] && rm -rf "$old"
  done
fi
# Link this checkout (an editable install; no dependency resolution, seconds).
"$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$here" >&2
# The dev cluster's binaries (kube-apiserver, controller manager, scheduler, kubectl, etcd, kwok, helm),
# Kueue's and Flux's controllers and the MLflow tracking server (in a cached environment of its
# own: its pins clash with the trainer's) -- the tests run them; built here, once, not in a test.
[ "$python_only" = 1 ] || "$venv/bin/kubetune" dev-cluster build --with kueue --with flux \
  --with mlflow >&2
echo "$venv"
