#!/usr/bin/env bash
# Multi-node training with torchrun: run this script on every node (2 nodes x 8 GPUs here). torchrun starts one
# process per GPU and joins them through a c10d rendezvous on the first node; Lightning reads torchrun's
# environment, rank 0 alone writes to MLflow (use a shared store: an MLflow server, MLFLOW_TRACKING_URI).
#   MASTER=node0.example:29500 NODES=2 bash recipes/cluster/torchrun.sh [recipe] [extra keys ...]
# Expect: throughput not measured yet (no multi-node machine has run it); the two-node rendezvous itself is
#         tested on one machine (tests/test_training.py, two agents on a loopback port).
set -euo pipefail
RECIPE=${1:-recipes/imagenet/resnet50_224_step90.yaml}
shift || true
GPUS=${GPUS:-8}
exec torchrun --nnodes="${NODES:-2}" --nproc-per-node="$GPUS" --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER:?set MASTER=host:port of the first node}" --rdzv-id="${JOB_ID:-cnnlab}" \
  -m cnnlab fit --config "$RECIPE" --trainer.num_nodes="${NODES:-2}" --trainer.devices="$GPUS" \
  --trainer.strategy=ddp --ckpt_path last "$@"
