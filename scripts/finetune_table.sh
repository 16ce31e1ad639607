#!/usr/bin/env bash
# The fine-tuned comparison of docs/finetune.md: ResNet-56 on CIFAR-10 at QSFM's -48.27% MACs, four scorers,
# each with no recovery and with the best post-training recovery, then fine-tuned (finetune=cpu_short).
#   bash scripts/finetune_table.sh DATA_ROOT RESNET56_CHECKPOINT OUT_DIR [extra overrides...]
set -euo pipefail
usage="usage: finetune_table.sh DATA_ROOT RESNET56_CHECKPOINT OUT_DIR [overrides...]"
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
data=$1; ckpt=$2; out=$3; shift 3
common=(model=resnet56 "model.checkpoint=$ckpt" dataset=cifar10 "dataset.root=$data" progress=false
        "cache.dir=$out/cache" "hydra.sweep.dir=$out/runs" prune=target prune.target_macs_reduction=0.4827
        finetune=cpu_short scorer=qsfm,simscore,l1,random "$@")
qsfm-run -m "${common[@]}" recover=none
qsfm-run -m "${common[@]}" recover=lstsq recover.bn_images=1024
qsfm-report "$out/runs" --out "$out/report"
