#!/usr/bin/env bash
# One prepared GPU run (`make bench-gpu`), on one H100/H200 in <= 8 minutes, one JSON: checks of
# the training step (captured == eager within bound, no host sync), cifar10 U-Net training steps/s
# at batch 128 and 256 samples x 1000 steps against diffusers, a profile of the compiled step, and
# the 256x256 preset (batch 64 steps/s, 128 samples); see benchmarks/gpu.py.
#
# Needs a CUDA torch (plus numpy, safetensors, tqdm) and nothing from the network: diffusers and the
# modules it imports come as wheels from benchmarks/wheels/ (`make bench-gpu-wheels` fills it on a
# machine with a package index; it is git-ignored, so send it along with the working tree, e.g. as
# the `carry` of a remote run: carry=["benchmarks/wheels"]). Only the packages the machine lacks,
# or has in too old a version, are installed (pip --no-deps --no-index). The project itself runs
# from src/ (PYTHONPATH), not installed.
#
#   benchmarks/gpu.sh [--out FILE.json] [--no-compile] [any benchmarks/gpu.py option]
#   benchmarks/gpu.sh --dry-run          # the same steps on the CPU with a tiny U-Net
#
# Environment: PY (python, default python3), WHEELS (default benchmarks/wheels), LIMIT_S (a hard
# stop for the measurement, default 470 s, leaving the install and start-up inside 8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=${WHEELS:-benchmarks/wheels}
LIMIT_S=${LIMIT_S:-470}

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "benchmarks/gpu.sh: diffusers is not installed and $WHEELS/ has no wheels;" \
             "run 'make bench-gpu-wheels' where a package index is reachable and carry $WHEELS along" >&2
        exit 2
    fi
    # -r: each requirement already satisfied by the machine is left alone; the others come from
    # the carried wheels matching this Python (no index, no dependency resolution beyond the list).
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-index --find-links "$WHEELS" \
        -r benchmarks/gpu-requirements.txt
fi
"$PY" -c "from diffusers import UNet2DModel, DDPMScheduler; from diffusers.training_utils import EMAModel"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT --kill-after=20 "$LIMIT_S" "$PY" benchmarks/gpu.py "$@"
