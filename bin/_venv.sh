# Sourced by bin/ scripts: make sure a virtualenv exists with asyncrunner installed (extras in
# $1). The virtualenv is .venv, or $ASYNCRUNNER_VENV; the interpreter python3, or $PYTHON.
# Installer chatter goes to $VENV/install.log and is shown only when the install fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="${ASYNCRUNNER_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
extras="${1:-}"
stamp="$VENV/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing asyncrunner${extras:+[$extras]} into $VENV ..." >&2
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$VENV/bin/python" -m pip install --disable-pip-version-check -e ".${extras:+[$extras]}"; } \
       > "$VENV/install.log" 2>&1; then
    cat "$VENV/install.log" >&2
    echo "installation failed (log above, also in $VENV/install.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
