# Sourced by scripts/demo.sh and scripts/test.sh: makes sure .venv exists with emotune and its
# dependencies installed (again whenever pyproject.toml changes), then sets quiet, offline-friendly defaults.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EMOTUNE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "emotune needs Python 3.11 or newer; '$PYTHON' is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
        exit 1
    fi
    echo "Creating the virtual environment $VENV ..."
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.emotune-pyproject"
if [ ! -f "$stamp" ] || ! cmp -s "$ROOT/pyproject.toml" "$stamp"; then
    echo "Installing emotune and its dependencies into $VENV (a few minutes the first time) ..."
    # some machines' pip.conf names local index folders that lack most packages: pip warns once per package
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    cp "$ROOT/pyproject.toml" "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_DISABLE_PROGRESS_BARS=1   # transformers' weight-loading bars would bury the useful output
export TOKENIZERS_PARALLELISM=false     # tokenizers warns about forked workers otherwise
