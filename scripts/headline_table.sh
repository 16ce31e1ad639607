#!/usr/bin/env bash
# docs/recovery.md's headline table: experiment=qsfm_resnet56_profile (QSFM's -48.27% MACs / -57.90% params
# profile, no labels, no fine-tuning) with QSFM's order, then L1, FPGM and random orders, then on ResNet-20;
# every row a qsfm-run of its own on all 10,000 test images, then the table with each stage's wall time.
#   bash scripts/headline_table.sh DATA_ROOT CHECKPOINT_DIR OUT_DIR [extra overrides...]
# CHECKPOINT_DIR holds resnet56-4bfd9763.th and resnet20-12fca82f.th.
set -euo pipefail
case ${1:-} in  # --help: the comment above
  -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
esac
usage="usage: headline_table.sh DATA_ROOT CHECKPOINT_DIR OUT_DIR [overrides...]"
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
data=$1; ckpts=$2; out=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
common=(experiment=qsfm_resnet56_profile "dataset.root=$data" progress=false "cache.dir=$out/cache" "$@")
r56=("${common[@]}" "model.checkpoint=$ckpts/resnet56-4bfd9763.th")
qsfm-run "${r56[@]}" "hydra.run.dir=$out/resnet56/qsfm"
for scorer in l1 fpgm random; do
  qsfm-run "${r56[@]}" "scorer=$scorer" "hydra.run.dir=$out/resnet56/$scorer"
done
qsfm-run "${common[@]}" model=resnet20 "model.checkpoint=$ckpts/resnet20-12fca82f.th" "hydra.run.dir=$out/resnet20/qsfm"
python "$here/headline_table.py" "$out" | tee "$out/headline_table.md"
