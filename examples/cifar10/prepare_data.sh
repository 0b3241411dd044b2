#!/usr/bin/env bash
# Download CIFAR-10 (about 170 MB, needs internet) with torchvision into the folder that
# src/data.py reads by default, so that `--dataset cifar10` works afterwards.
#
# Usage: ./prepare_data.sh [DATA_PATH]      (default: /tmp/flkit_data/cifar10)
#        PYTHON=.venv/bin/python ./prepare_data.sh
# A different DATA_PATH must then be passed to the scripts: --script_args "--data_path DATA_PATH".
set -euo pipefail

DATA_PATH="${1:-/tmp/flkit_data/cifar10}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$DATA_PATH"
"$PYTHON" - "$DATA_PATH" <<'PY'
import sys

import torchvision

root = sys.argv[1]
for train in (True, False):
    torchvision.datasets.CIFAR10(root=root, train=train, download=True)
print(f"CIFAR-10 is ready in {root}")
PY
