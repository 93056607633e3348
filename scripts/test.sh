#!/usr/bin/env bash
# Set-up command 2: create the environment if missing, lint, then run the test suite.
#   scripts/test.sh              the linter (ruff check), then every test: what CI runs
#   scripts/test.sh --quick      the linter, then the tests not marked slow (no whole searches, clusters, servers
#                                or signals): a few minutes, for between two edits
#   scripts/test.sh -k corpus    extra arguments go to pytest (also after --quick)
#   scripts/test.sh -n 0         one process instead of two workers (pytest-xdist; a test file stays on one worker,
#                                so the fixtures a file shares, a cluster or a server, are built once)
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
quick=()
if [ "${1:-}" = "--quick" ]; then
    shift
    quick=(-m "not slow")
fi
ruff check . || { echo "ruff found the problems above: fix them (ruff check --fix . fixes some by itself)." >&2; exit 1; }
set +e
python -m pytest -n 2 --dist loadfile "${quick[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure, not a pass." >&2
    exit 1
fi
exit "$rc"
