#!/usr/bin/env bash
# Installs what the framework compatibility matrix (issue #5; Tests/integration/test_frameworks_*.py,
# test_peer_suites.py) needs on top of scripts/install-python-deps.sh:
#   - Python, into <repo>/.venv, CPU wheels only: tensorflow-cpu, jax[cpu] + orbax-checkpoint,
#     keras 3, transformers, joblib, pyspark. They share the venv with torch 2.13.0+cpu and
#     numpy 2.x (pip resolves one consistent set; `pip check` below proves it).
#   - Debian: a Java 17 runtime for Spark (only if `java` is missing), stress-ng, fio.
# Idempotent: what is installed at the pinned version is skipped, so a warm machine spends
# about a second here. FRAMEWORK_DEPS=0 skips the whole step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "${FRAMEWORK_DEPS:-1}" = 0 ] && { echo "framework deps: skipped (FRAMEWORK_DEPS=0)"; exit 0; }
PY="$PWD/.venv/bin/python"
if [ ! -x "$PY" ]; then
    echo "error: .venv missing; run scripts/install-python-deps.sh first" >&2
    exit 1
fi

need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v stress-ng >/dev/null 2>&1 || need+=(stress-ng)
command -v fio >/dev/null 2>&1 || need+=(fio)
if [ "${#need[@]}" -gt 0 ]; then
    . scripts/lib-apt.sh
    apt_install "${need[@]}"
fi

# Pinned so that CI runs what docs/COMPATIBILITY.md reports.
PINS=(
    "tensorflow-cpu==2.21.0"
    "jax==0.10.2" "jaxlib==0.10.2"
    "orbax-checkpoint==0.12.8"
    "keras==3.15.1"
    "transformers==5.24.0"
    "joblib==1.6.0"
    "pyspark==4.3.0"
)
missing=()
for pin in "${PINS[@]}"; do
    name="${pin%%==*}"; ver="${pin##*==}"
    "$PY" - "$name" "$ver" <<'PYEOF' || missing+=("$pin")
import sys
from importlib import metadata
try:
    sys.exit(0 if metadata.version(sys.argv[1]) == sys.argv[2] else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PYEOF
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    # torch stays at its pinned CPU build: name it so pip never swaps it for another.
    torch_pin="torch==$("$PY" -c 'from importlib import metadata; print(metadata.version("torch"))')"
    "$PY" -m pip install --quiet --disable-pip-version-check "${missing[@]}" "$torch_pin"
    "$PY" -m pip check
fi
echo "framework deps ok: $(java -version 2>&1 | head -1); $(stress-ng --version 2>&1 | head -1); $(fio --version)"
