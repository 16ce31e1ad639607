#!/usr/bin/env bash
# The fine-tuned comparison of docs/finetune.md: ResNet-56 on CIFAR-10 at QSFM's -48.27% MACs (one uniform
# ratio), four scorers, each with no recovery and with the best post-training recovery (blockwise), then
# fine-tuned with finetune=cpu_short on all training images; the report holds finetune.png.
#   bash scripts/finetune_table.sh DATA_ROOT RESNET56_CHECKPOINT OUT_DIR [extra overrides...]
set -euo pipefail
case ${1:-} in  # --help: the comment above
  -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
esac
usage="usage: finetune_table.sh DATA_ROOT RESNET56_CHECKPOINT OUT_DIR [overrides...]"
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
data=$1; ckpt=$2; out=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
qsfm-run -m model=resnet56 "model.checkpoint=$ckpt" dataset=cifar10 "dataset.root=$data" progress=false \
  "cache.dir=$out/cache" "hydra.sweep.dir=$out/runs" prune=target prune.target_macs_reduction=0.4827 \
  eval.latency_batches=[] finetune=cpu_short execution.amp=bf16 scorer=qsfm,simscore,l1,random \
  recover=none,blockwise "$@"
qsfm-report "$out/runs" --out "$out/report"
python "$here/finetune_table.py" "$out/runs" > "$out/finetune_table.md"
cat "$out/finetune_table.md"
