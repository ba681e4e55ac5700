#!/usr/bin/env bash
# The `tally` Python package: builds the abi3 wheel with maturin, installs it in a venv
# and runs its pytest suite against a real tallyd. CI runs it after `cargo test
# --workspace`, which built the debug tallyd and tally-publisher the tests start.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-$PWD/target}"
venv="$target/pyenv"
# Pinned: the build and test tools are part of what CI checks.
maturin_version=1.16.0
pytest_version=9.2.0

# Debian's python3 has no venv module (ensurepip) without python3-venv.
if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! "$venv/bin/maturin" --version 2>/dev/null | grep -qx "maturin $maturin_version" \
    || ! "$venv/bin/python" -m pytest --version 2>&1 | grep -qx "pytest $pytest_version"; then
    "$venv/bin/pip" install -q --disable-pip-version-check \
        "maturin==$maturin_version" "pytest==$pytest_version"
fi

rm -rf "$target/wheels/tally-"*.whl
"$venv/bin/maturin" build -q -m python/Cargo.toml --interpreter "$venv/bin/python" --out "$target/wheels"
wheel=$(ls "$target/wheels/tally-"*-abi3-*.whl)
echo "python: built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"

# From outside the source tree, so that `import tally` is the installed wheel.
cd python/tests
TALLY_BIN_DIR="${TALLY_BIN_DIR:-$target/debug}" PYTHONDONTWRITEBYTECODE=1 \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider .
