#!/usr/bin/env bash
# Plain against self-distillation ResNet18 on one GPU, at equal epochs, in about 5 minutes in all
# (docs/reproducing.md, "A five-minute GPU check"). Runs sdtool from this source tree: no install needed,
# only torch, torchvision and numpy (Pillow for JPEG data).
#
#   cp -r ../shared/data/cifar10 benchmarks/cifar10      # the data beside this script (or --data DIR)
#   bash benchmarks/gpu_reproduce.sh --out runs/gpu_reproduce
#   bash benchmarks/gpu_reproduce.sh --smoke --data fake --out /tmp/gpu_smoke   # CPU check, seconds
#
# Every option is gpu_reproduce.py's (--help lists them); PYTHON chooses the interpreter (default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$here/gpu_reproduce.py" "$@"
