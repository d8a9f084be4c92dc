#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install the package with its dev extra.
# Re-running is cheap: it reinstalls only when pyproject.toml is newer than the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed
if [[ -f $stamp && $stamp -nt pyproject.toml ]]; then exit 0; fi

find_python() {
  for c in python3.12 python3.13 python python3 "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python; do
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  echo "error: Python >= 3.12 not found (JAX 0.11 needs it). Install it, e.g. 'pyenv install 3.12'." >&2
  return 1
}

if [[ ! -x .venv/bin/python ]]; then
  py=$(find_python)
  echo "creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
# Registry downloads are sometimes cut off mid-file (stop 28's CI died that way), so pip retries
# and resumes, and the whole install is tried up to three times before giving up.
pip_install() {
  local attempt
  for attempt in 1 2 3; do
    if .venv/bin/python -m pip install -q --retries 10 --timeout 60 "$@"; then return 0; fi
    echo "pip install $* failed (attempt $attempt of 3); retrying in 10 s" >&2
    sleep 10
  done
  return 1
}
pip_install --upgrade pip
pip_install --resume-retries 10 -e ".[dev]"
touch "$stamp"
