#!/usr/bin/env bash
# Install bz-example-plugins next to bz, run its tests, type-check it, list it, train with it.
#
#   examples/custom-plugin/ci.sh [--no-mypy]        (PYTHON=.venv/bin/python by default)
#
# The package goes into a temporary folder on PYTHONPATH (pip install --target), so the
# environment bz lives in is left exactly as it was. --no-deps: bz-cli is already there.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
run_mypy=1
[[ "${1:-}" == "--no-mypy" ]] && run_mypy=0

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== install bz-example-plugins into $work/site"
"$python" -m pip install --quiet --no-deps --target "$work/site" "$here"
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"

echo "== the package's tests"
(cd "$here" && "$python" -m pytest -q -p no:cacheprovider)

if [[ $run_mypy == 1 ]]; then
    echo "== mypy --strict, with the package's own configuration"
    (cd "$here" && "$python" -m mypy --cache-dir "$work/mypy-cache")
fi

echo "== bz list-plugins --verbose"
"$python" -m bz list-plugins --verbose
"$python" -m bz list-plugins | grep "^epoch_timer .*bz-example-plugins 0.1.0" > /dev/null

echo "== bz train"
mkdir "$work/project"
cp "$here/bzconfig.json" "$here/train.py" "$work/project/"
(cd "$work/project" && "$python" -m bz train)
test -s "$work/project/runs/training.log"
echo "== ok: $(wc -l < "$work/project/runs/training.log") lines in runs/training.log"
