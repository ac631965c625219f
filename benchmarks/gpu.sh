#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md, measured in one run on one GPU, the most important first.
#   bash benchmarks/gpu.sh LOGDIR [CIFAR10_FOLDER [STEP ...]]
# Steps: train_throughput time_to_accuracy real_data_resnet50 data_throughput compress (default: all).
# Each step has its own time limit; its whole output goes to LOGDIR/<step>.log and its figures to stdout.
# Fits run without MLflow tracking (--trainer.logger=false), so the GPU host needs no tracking stack.
#   bash benchmarks/gpu.sh --dry-run LOGDIR [CIFAR10_FOLDER [STEP ...]]
# runs every step on this machine's CPU at tiny sizes (a step or two each), so that the script is known to work
# before a GPU sees it; its figures mean nothing.
set -u
DRY=
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
tiny() { [[ -z $DRY ]] || echo "$@"; } # arguments of the dry run, after the real ones (argparse keeps the last)
LOG=${1:?usage: bash benchmarks/gpu.sh [--dry-run] LOGDIR [CIFAR10_FOLDER [STEP ...]]}
DATA=${2:-../shared/data/cifar10}
shift $(($# < 2 ? $# : 2))
STEPS=${*:-train_throughput time_to_accuracy real_data_resnet50 data_throughput compress}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
FIGURES='img/s|ratio|top-1|target|x faster|points|i/s|no working CUDA|Error|error|Traceback'
step() {
  local name=$1 seconds=$2 start=$SECONDS
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  [[ -z $DRY ]] || seconds=900 # the CPU is slower, whatever the sizes
  echo "=== $name: $*"
  timeout "$seconds" "$@" >"$LOG/$name.log" 2>&1
  echo "--- exit $?, $((SECONDS - start)) s"
  grep -E "$FIGURES" "$LOG/$name.log" | grep -v "Warning" | tail -30
}
[[ -n $DRY ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())"
step train_throughput 230 python3 benchmarks/train_throughput.py --no-tracking --compile-resnet50 --steps 20 \
  $(tiny --quick --steps 1 --repeats 1 --families resnet18)
step time_to_accuracy 125 python3 benchmarks/time_to_accuracy.py --config recipes/cifar10/resnet18_32_onecycle40_gpu.yaml \
  --target 0.94 --seconds 90 --data.source="$DATA" --trainer.logger=false \
  $(tiny --trainer.accelerator=cpu --trainer.max_epochs=1 --trainer.limit_train_batches=2 --trainer.limit_val_batches=1 \
    --trainer.limit_test_batches=1 --data.batch_size=16 --data.num_workers=0)
step real_data_resnet50 75 python3 benchmarks/overhead.py --model resnet50 --image-size 224 --batch-size 256 --steps 20 \
  --warmup 8 --repeats 1 --no-tracking --source "$DATA" --device-augment flip \
  $(tiny --image-size 32 --batch-size 8 --steps 2 --warmup 1)
step data_throughput 90 python3 benchmarks/data_throughput.py --data "$DATA" --device cuda $(tiny --device cpu --images 200 --batches 2)
step compress 280 python3 benchmarks/compress.py --epochs 8 --no-tracking --data "$DATA" --test-images 2000 --runs 30 --device cuda \
  $(tiny --device cpu --epochs 1 --limit-batches 2 --batch-size 16 --test-images 32 --runs 2)
