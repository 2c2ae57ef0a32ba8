#!/usr/bin/env bash
# The test command (README): services up, then every test. Fails when a test fails or when none ran.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tests/services.sh || exit 1
python -m pytest -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "no tests were collected: failing on purpose" >&2
    exit 1
fi
exit "$status"
