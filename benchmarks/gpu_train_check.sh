#!/usr/bin/env bash
# The training-speed checks of one GPU session, as ONE command on a bare GPU machine (H100/H200,
# torch preinstalled, no network), in at most about 8 minutes:
#
#   environment, the carried wheels (the smp baseline), the extension build, the benchmark table
#   (paper 512x512 batch 8 bf16 channels-last with gradient checkpointing, small 256x256, smp Unet
#   ResNet-50), the profiler's top kernels, local attention in levels 0-2 / all levels, a 1-process
#   torchrun (NCCL) run, data loading alone with 8/16 workers, the compiled step (local attention
#   first), the profile with local attention, a short `unet.train --compile` run, and the local
#   attention CUDA tests; then a summary.
#
#     bash benchmarks/download_wheels.sh               # once, on a machine with network (-> .whl/)
#     bash benchmarks/gpu_train_check.sh OUTDIR        # on the GPU machine, from the repository root
#     bash benchmarks/gpu_train_check.sh OUTDIR --cpu-smoke   # every step at CPU scale, to test this script
#
# Every step runs under its own `timeout` (times TIMEOUT_SCALE, default 1; 5 with --cpu-smoke), and
# no step starts once BUDGET_S seconds (default 450; 3600 with --cpu-smoke) have passed, so the
# command ends in time and its results come back; the most telling steps come first. OUTDIR gets
# log.txt (all output), steps.tsv (each step's exit status and seconds), bench.jsonl (one JSON line
# per benchmark case), summary.txt and profile/*.trace.json.gz: six files.
set -uo pipefail  # not -e: a failing step is recorded and the next one runs

usage() { echo "usage: $0 OUTDIR [--cpu-smoke]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
out=$1
smoke=0
if [[ $# -eq 2 ]]; then
    [[ $2 == --cpu-smoke ]] || usage
    smoke=1
fi
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out/profile" || exit 1
out=$(cd "$out" && pwd)
log=$out/log.txt
: >"$log"
printf 'step\tstatus\tseconds\n' >"$out/steps.tsv"
rm -f "$out/bench.jsonl"

export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
bench=("$py" -m benchmarks.train_speed --json "$out/bench.jsonl")
if ((smoke)); then
    budget=${BUDGET_S:-3600}
    timeout_scale=${TIMEOUT_SCALE:-5}
    device=cpu
    build_env=(LOCALATTN_WITH_CUDA=0 MAX_JOBS=2)
    bench+=(--tiny --device cpu --steps 2 --warmup 1)
    train_run=(--device cpu --preset tiny --image-size 32 --batch-size 4 --num-images 8 --threads 1 --workers 0)
    la_levels=0,1,2
    loading=(--image-size 64 --batches 4 --workers "0,1")
    loading_large=(--image-size 128 --batches 2 --workers 1)
else
    budget=${BUDGET_S:-450}
    timeout_scale=${TIMEOUT_SCALE:-1}
    device=cuda
    build_env=(LOCALATTN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16)
    bench+=(--device cuda --steps 10 --warmup 3)
    train_run=(--device cuda --preset small --image-size 256 --batch-size 8 --num-images 64 --workers 8
               --amp bf16 --channels-last)
    la_levels=0,1,2,3
    loading=(--image-size 256 --batches 40 --workers "8,16")
    loading_large=(--image-size 512 --batches 20 --workers 16)
fi
started=$SECONDS

# step NAME TIMEOUT COMMAND...: run COMMAND under `timeout`, tee its output into the log, record it.
step() {
    local name=$1 limit=$(($2 * timeout_scale))
    shift 2
    local left=$((budget - (SECONDS - started)))
    if ((left < 30)); then
        echo "== $name: not run, the ${budget}s budget is spent" | tee -a "$log"
        printf '%s\tnot run\t0\n' "$name" >>"$out/steps.tsv"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
    local begin=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    ((status == 124 || status == 137)) && status="timed out"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - begin))" >>"$out/steps.tsv"
}

runs=${TMPDIR:-/tmp}/gpu_train_check_runs  # checkpoints of the unet.train runs, kept out of OUTDIR
environment=("$py" -c 'import os, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda,
      "cores", len(os.sched_getaffinity(0)))
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))')
# Packages already there that satisfy smp's requirements are kept; missing ones come from .whl/.
install_wheels=(bash -c "if compgen -G '.whl/*.whl' >/dev/null; then
        $py -m pip install --quiet --no-index --find-links .whl segmentation-models-pytorch
    else
        echo 'no .whl/*.whl carried (benchmarks/download_wheels.sh makes them)'
    fi
    $py -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|timm|huggingface.hub|safetensors|segmentation.models.pytorch) '
    $py -c 'import segmentation_models_pytorch as smp; print(\"segmentation_models_pytorch\", smp.__version__)'")
kernel_check=("$py" -c "import localattn; print('localattn kernel on $device:', localattn.kernel_available('$device'))")
compile_run=(env "TORCH_LOGS=graph_breaks,recompiles" "$py" -m unet.train "${train_run[@]}" --compile
             --local-attention-levels "$la_levels" --epochs 1 --eval-every 0 --output "$runs/compile")
torchrun_run=(env NCCL_DEBUG=VERSION "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m unet.train
              "${train_run[@]}" --epochs 1 --eval-every 0 --output "$runs/torchrun")

summary() {
    echo "== summary (${SECONDS}s)"
    column -t -s $'\t' "$out/steps.tsv" 2>/dev/null || cat "$out/steps.tsv"
    if [[ -s $out/bench.jsonl ]]; then
        "$py" -m benchmarks.train_speed --summary "$out/bench.jsonl"
    fi
    grep -hE '^training .*\(DDP|^final mean IoU|[Gg]raph break|^localattn kernel on|NCCL version' "$log" || true
}

if ((!smoke)); then
    step nvidia-smi 30 nvidia-smi
fi
step environment 60 "${environment[@]}"
step wheels 120 "${install_wheels[@]}"
step build 360 env "${build_env[@]}" "$py" setup.py build_ext --inplace
step kernel-check 60 "${kernel_check[@]}"
step bench-eager 180 "${bench[@]}" --cases paper512,paper512-gc,small256,smp-r50-512,smp-r50-256
step profile 120 "${bench[@]}" --cases paper512 --profile-only --profile "$out/profile" --profile-steps 2
step bench-local-attention 150 "${bench[@]}" --cases paper512-la012,paper512-la-all,small256-la-all
step torchrun-nccl 120 "${torchrun_run[@]}"
step data-loading 90 "${bench[@]}" --data-loading --batch-size 8 "${loading[@]}"
step data-loading-large 60 "${bench[@]}" --data-loading --batch-size 8 "${loading_large[@]}"
# Local attention first: compiling with it is the check; the second compile reuses most kernels.
step bench-compile 240 env "TORCH_LOGS=graph_breaks,recompiles" "${bench[@]}" --cases paper512-la012-compile,paper512-compile
step profile-local-attention 90 "${bench[@]}" --cases paper512-la012 --profile-only --profile "$out/profile" --profile-steps 2
step compile-train 180 "${compile_run[@]}"
step localattn-cuda-tests 120 "$py" -m pytest -q -x -p no:cacheprovider -m cuda tests/test_localattn_cuda.py
summary 2>&1 | tee "$out/summary.txt"
