#!/usr/bin/env bash
# The test command: set-up (idempotent), then the whole suite. Extra arguments go to pytest.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh" || exit 1
cd "$ROOT"
python -m pytest tests -q -p no:cacheprovider -W ignore::DeprecationWarning "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose (a test run that ran nothing is not a pass)"
  exit 1
fi
exit "$rc"
