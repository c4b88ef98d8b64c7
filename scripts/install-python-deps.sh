#!/usr/bin/env bash
# Installs the Python dependencies of the real-mount integration suite
# (Tests/integration) into <repo>/.venv. Idempotent: re-running only installs
# what is missing.
#
# torch is pinned to the CPU wheel (2.13.0+cpu) that pip finds through its
# configured find-links; the CUDA build is never installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$(pwd)"
VENV="$REPO_ROOT/.venv"
PY="$VENV/bin/python"
TORCH_VERSION="${TORCH_VERSION:-2.13.0+cpu}"

if [ ! -x "$PY" ]; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 needs python3-venv (ensurepip) for venvs.
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "python3 -m venv failed; installing python3-venv" >&2
            apt-get update -qq
            pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${pyver}-venv" \
                || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            rm -rf "$VENV"
            python3 -m venv "$VENV"
        else
            echo "error: python3 -m venv failed (is python3-venv installed?)" >&2
            exit 1
        fi
    fi
fi
# Some tools look for .venv/bin/python specifically; make sure it exists.
if [ ! -e "$VENV/bin/python" ] && [ -x "$VENV/bin/python3" ]; then
    ln -s python3 "$VENV/bin/python"
fi

# Returns 0 if the distribution is installed in the venv (optionally at an
# exact version).
have() {
    "$PY" - "$@" <<'PYEOF'
import sys
from importlib import metadata
name = sys.argv[1]
want = sys.argv[2] if len(sys.argv) > 2 else None
try:
    v = metadata.version(name)
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if want is None or v == want else 1)
PYEOF
}

missing=()
for pkg in pytest numpy safetensors h5py; do
    have "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    "$PY" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
fi

if ! have torch "$TORCH_VERSION"; then
    echo "installing: torch==$TORCH_VERSION"
    # --find-links from pip's configuration provides the CPU wheel; the
    # exact local version (+cpu) keeps pip from resolving a CUDA build.
    # torch's own dependencies (filelock, sympy, ...) come from PyPI.
    extra=()
    if [ -d /opt/wheels ]; then extra+=(--find-links /opt/wheels); fi
    "$PY" -m pip install --quiet --disable-pip-version-check "${extra[@]}" "torch==$TORCH_VERSION"
fi

"$PY" -c 'import pytest, numpy, safetensors, h5py, torch; print("python deps ok: torch", torch.__version__, "numpy", numpy.__version__)'
