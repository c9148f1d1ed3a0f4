#!/usr/bin/env bash
# Resume the newest resumable experiment (running with a dead lock, interrupted, failed).
# Shows it and asks for confirmation on a terminal; pass --yes to skip the question.
#   bin/resume_experiment.sh --db data/production_20k.db [--yes] [--workers N]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/asyncrunner" ]; then
  exec "$ROOT/.venv/bin/asyncrunner" resume --latest "$@"
fi
exec asyncrunner resume --latest "$@"
