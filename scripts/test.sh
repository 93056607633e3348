#!/usr/bin/env bash
# Set-up command 2: create the environment if missing, then run the whole test suite.
#   scripts/test.sh            all tests
#   scripts/test.sh -k corpus  extra arguments go to pytest
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure, not a pass." >&2
    exit 1
fi
exit "$rc"
