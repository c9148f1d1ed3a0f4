# Sourced by bin/ scripts: make sure .venv exists with asyncrunner installed (extras in $1).
# Installer chatter goes to .venv/install.log and is shown only when the install fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extras="${1:-}"
stamp=".venv/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing asyncrunner${extras:+[$extras]} into .venv ..." >&2
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check -e ".${extras:+[$extras]}"; } \
       > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "installation failed (log above, also in .venv/install.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
