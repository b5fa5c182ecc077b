#!/bin/sh
# The image's install steps, also run by the tests in a fresh virtual environment:
#   docker/install.sh deps <extra>   dependencies of one target (operator | trainer), pinned
#   docker/install.sh app            our code, no dependency resolution
# Run from the folder holding pyproject.toml and constraints.txt. Extra pip flags (e.g.
# --dry-run) may follow.
set -eu
step="${1:-}"
case "$step" in
  deps)
    extra="$2"; shift 2
    requirements="$(mktemp)"
    python docker/deps.py "$extra" > "$requirements"
    python -m pip install --disable-pip-version-check -r "$requirements" -c constraints.txt "$@"
    python docker/deps.py "$extra" --no-deps > "$requirements"
    if [ -s "$requirements" ]; then
      python -m pip install --disable-pip-version-check --no-deps -r "$requirements" "$@"
    fi
    rm -f "$requirements"
    ;;
  app)
    shift
    python -m pip install --disable-pip-version-check --no-deps . "$@" ;;
  *)
    echo "usage: docker/install.sh deps <extra> | app" >&2; exit 2 ;;
esac
