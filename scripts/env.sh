# Sourced by scripts/test.sh and scripts/demo.sh: create .venv on first use and (re)install dfpipe into it
# whenever setup.py changes. torch>=2.14 comes from the package registry (the CUDA build; it runs on CPU too).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.dfpipe-installed-$(sha256sum setup.py | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
