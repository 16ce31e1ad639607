#!/usr/bin/env bash
# Rerun the published rows we have configs for, on a local CIFAR-10 copy and the public ResNet weights.
#   bash scripts/paper_rows.sh DATA_ROOT RESNET56_CHECKPOINT RESNET110_CHECKPOINT OUT_DIR [extra overrides...]
# e.g. bash scripts/paper_rows.sh ~/data r56.th r110.th outputs/paper_rows finetune=none
# The HRank/CHIP rows fine-tune as their papers do (a GPU job); add finetune=none to see the pruned
# networks' size and accuracy before fine-tuning, as docs/results.md's table does on a CPU. The CHIP ResNet-110
# row is skipped when RESNET110_CHECKPOINT is not a file.
set -euo pipefail
case ${1:-} in  # --help: the comment above
  -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
esac
usage="usage: paper_rows.sh DATA_ROOT RESNET56_CHECKPOINT RESNET110_CHECKPOINT OUT_DIR [overrides...]"
if [ $# -lt 4 ]; then
  echo "$usage" >&2
  exit 2
fi
data=$1; r56=$2; r110=$3; out=$4
case $out in
  *=*) echo "OUT_DIR must be a folder, got the override '$out'; $usage" >&2; exit 2 ;;
esac
shift 4
common=("dataset.root=$data" progress=false "cache.dir=$out/cache" "$@")
# QSFM without fine-tuning: the paper's own protocol (threshold searched for -48.27% MACs, twin folding),
# then the same MACs target reached with per-layer sensitivity allocation and least-squares compensation.
qsfm-run -m experiment=qsfm_resnet56 "model.checkpoint=$r56" "${common[@]}" "hydra.sweep.dir=$out/qsfm" \
  prune.allocation=threshold,sensitivity recover=twin,lstsq recover.bn_images=0,2048
for row in hrank_resnet56 chip_resnet56_a chip_resnet56_b; do
  qsfm-run "experiment=$row" "model.checkpoint=$r56" "${common[@]}" "hydra.run.dir=$out/$row"
done
if [ -f "$r110" ]; then
  qsfm-run experiment=chip_resnet110 "model.checkpoint=$r110" "${common[@]}" "hydra.run.dir=$out/chip_resnet110"
fi
qsfm-report "$out" --out "$out/report"
