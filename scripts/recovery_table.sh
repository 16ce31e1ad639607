#!/usr/bin/env bash
# docs/recovery.md's table: ResNet-56 on CIFAR-10 at QSFM's -48.27% MACs (one uniform ratio), six scorers x
# four post-training recoveries, no fine-tuning, all 10,000 test images; then the best recipe
# (experiment=qsfm_resnet56_posttrain) at -30% and -70% MACs. Every row is a qsfm-run of its own.
#   bash scripts/recovery_table.sh DATA_ROOT RESNET56_CHECKPOINT OUT_DIR [extra overrides...]
set -euo pipefail
case ${1:-} in  # --help: the comment above
  -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
esac
usage="usage: recovery_table.sh DATA_ROOT RESNET56_CHECKPOINT OUT_DIR [overrides...]"
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
data=$1; ckpt=$2; out=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
common=(model=resnet56 "model.checkpoint=$ckpt" dataset=cifar10 "dataset.root=$data" progress=false
        "cache.dir=$out/cache" eval.latency_batches=[] "$@")
table=("${common[@]}" prune=target prune.target_macs_reduction=0.4827 scorer=qsfm,simscore,l1,fpgm,chip,random)
qsfm-run -m "${table[@]}" "hydra.sweep.dir=$out/table" recover=none,sequential,blockwise
qsfm-run -m "${table[@]}" "hydra.sweep.dir=$out/table_lstsq" recover=lstsq recover.bn_images=2048
qsfm-run "${common[@]}" "hydra.run.dir=$out/best/headline" experiment=qsfm_resnet56_posttrain
qsfm-run -m "${common[@]}" "hydra.sweep.dir=$out/best" experiment=qsfm_resnet56_posttrain \
  prune.target_macs_reduction=0.3,0.7
python "$here/recovery_table.py" "$out" > "$out/recovery_table.md"
cat "$out/recovery_table.md"
