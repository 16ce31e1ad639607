#!/usr/bin/env bash
# Reproduce docs/results.md's ResNet-56 scorer table (CIFAR-10 test set, no fine-tuning) on a local CIFAR-10 copy.
#   bash scripts/scorer_table.sh DATA_ROOT CHECKPOINT [OUT_DIR]
# DATA_ROOT holds cifar-10-batches-py/; CHECKPOINT is resnet56-4bfd9763.th of pytorch_resnet_cifar10.
set -euo pipefail
case ${1:-} in  # --help: the comment above
  -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
esac
data=${1:?usage: scorer_table.sh DATA_ROOT CHECKPOINT [OUT_DIR]}
ckpt=${2:?usage: scorer_table.sh DATA_ROOT CHECKPOINT [OUT_DIR]}
out=${3:-outputs/scorer_table}
common=(experiment=scorer_table "model.checkpoint=$ckpt" "dataset.root=$data"
        progress=false "cache.dir=$out/cache")
# Every scorer x ratio (the grid lives in conf/experiment/scorer_table.yaml).
qsfm-run -m "${common[@]}" "hydra.sweep.dir=$out/scorers"
# The similarity score with the other two similarity metrics.
qsfm-run -m "${common[@]}" "hydra.sweep.dir=$out/simscore_metrics" scorer=simscore \
  scorer.metric=cosine,pearson prune.ratio=0.3,0.5,0.7
# What each no-fine-tune recovery option buys, alone and combined.
qsfm-run -m "${common[@]}" "hydra.sweep.dir=$out/recovery" scorer=qsfm prune.ratio=0.3,0.5,0.7 \
  recover=none,twin,lstsq recover.bn_images=0,2048
# Iterative pruning (statistics re-collected and compensation re-fitted between 2 steps), alone and combined.
qsfm-run -m "${common[@]}" "hydra.sweep.dir=$out/iterative" scorer=qsfm prune.ratio=0.3,0.5,0.7 \
  recover=none,lstsq recover.iterative_steps=2 recover.bn_images=0,2048
# The best recovery (lstsq + BN) for every other scorer too, so the criteria are compared on equal terms.
qsfm-run -m "${common[@]}" "hydra.sweep.dir=$out/recovery_all" scorer=simscore,l1,fpgm,hrank,chip,random \
  prune.ratio=0.3,0.5,0.7 recover=lstsq recover.bn_images=2048
qsfm-report "$out" --out "$out/report"
