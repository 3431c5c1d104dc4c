# Shared set-up for ./scripts/test and ./scripts/run (sourced, not run):
# creates .venv with Python >= 3.11 if missing and installs the kernel, every plugin under
# plugins/ and the dev tools. Re-installs only when a pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml plugins/*/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing the kernel, its plugins and the dev tools into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  plugin_args=()
  for d in plugins/*/; do
    [ -f "$d/pyproject.toml" ] && plugin_args+=(-e "$d")
  done
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" "${plugin_args[@]}"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
