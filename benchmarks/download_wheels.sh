#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_train_check.sh installs offline on a GPU machine without
# network (Python 3.12, x86-64): the segmentation_models_pytorch baseline, and timm in case the
# machine lacks it. smp's other needs (torch, torchvision, huggingface-hub, safetensors, numpy,
# pillow, tqdm) are expected there; gpu_train_check.sh reports the baseline as skipped otherwise.
#
#     bash benchmarks/download_wheels.sh [DEST]        # DEST defaults to .whl (git-ignored)
set -euo pipefail
dest=${1:-.whl}
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$dest" segmentation-models-pytorch==0.6.0 timm==1.0.31
ls -l "$dest"
du -sh "$dest"
