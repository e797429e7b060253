#!/usr/bin/env bash
# Idempotent Open MPI + mpi4py setup for the cluster tests (see /work/shared/CLUSTER.md).
#   1. Debian openmpi-bin + libopenmpi-dev, installed only if missing (needs root + apt).
#   2. mpi4py pip-installed into the active python (venv) only if it does not import.
# Prints one line per step saying what it did. Usage (venv active, or PYTHON=/path/to/python):
#   bash tests/cluster/setup_mpi.sh
set -euo pipefail

PYTHON="${PYTHON:-python}"
PKGS=(openmpi-bin libopenmpi-dev)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup_mpi: apt packages already installed: ${PKGS[*]}"
else
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup_mpi: need root to apt-get install ${missing[*]}" >&2; exit 1
    fi
    echo "setup_mpi: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/tagmoe-apt-mpi.log 2>&1; then
        apt-get update >>/tmp/tagmoe-apt-mpi.log 2>&1
        apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/tagmoe-apt-mpi.log 2>&1 \
            || { echo "setup_mpi: apt-get install failed, see /tmp/tagmoe-apt-mpi.log" >&2; exit 1; }
    fi
fi
command -v mpirun >/dev/null || { echo "setup_mpi: mpirun not on PATH after install" >&2; exit 1; }

if "$PYTHON" -c "import mpi4py" 2>/dev/null; then
    echo "setup_mpi: mpi4py already importable in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
else
    echo "setup_mpi: pip-installing mpi4py into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    "$PYTHON" -m pip install -q mpi4py \
        || { echo "setup_mpi: pip install mpi4py failed" >&2; exit 1; }
fi
"$PYTHON" -c "from mpi4py import MPI; print('setup_mpi: ok,', MPI.Get_library_version().splitlines()[0])"
