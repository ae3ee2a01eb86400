#!/usr/bin/env bash
# Installs what the build needs, once, into a cache outside the work tree:
#   - a Python venv with torch==2.13.0 from PyPI (tch 0.26 builds against it: LIBTORCH_USE_PYTORCH=1)
# Cargo's own dependencies come from crates.io at build time; protoc is vendored.
set -euo pipefail
CACHE="${ALNFL_CACHE:-$HOME/.cache/alnfl}"
VENV="$CACHE/venv"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.torch-$TORCH_VERSION"

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
command -v python3 >/dev/null || { echo "setup: python3 not found; it is needed for the PyTorch runtime" >&2; exit 1; }

if [ -f "$STAMP" ]; then
  exit 0
fi
mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating Python venv in $VENV"
  python3 -m venv "$VENV" || { echo "setup: python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
echo "setup: installing torch==$TORCH_VERSION into $VENV (about 2.6 GB, once)"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
touch "$STAMP"
echo "setup: done"
