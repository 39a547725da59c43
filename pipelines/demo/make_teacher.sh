#!/usr/bin/env bash
# Re-make the demo's teacher checkpoint, pipelines/demo/teacher.pt (about 25 minutes on an idle 2-core machine with KDCACHE_THREADS=2):
#   bash pipelines/demo/make_teacher.sh [WORK_FOLDER]
# The teacher is trained on 4000 demo frames (seed 0). The first 600 of them are, bit for bit,
# the training split of pipelines/demo.yaml (the demo data are generated system by system from
# the seed), so the students train on a subset of the teacher's data, as when distilling a model
# trained on more data than one has labels for; validation and test splits are shared, and never
# trained on. The checkpoint keeps the EMA weights only (no optimiser state), so it stays small.
set -euo pipefail
cd "$(dirname "$0")/../.."
work="${1:-runs/demo-teacher}"
kdcache data demo "$work/data" --num-train 4000 --num-val 100 --num-test 200 --seed 0
kdcache --threads "${KDCACHE_THREADS:-1}" train -c pipelines/demo/teacher.yaml \
    --data "$work/data/train.lmdb" --val "$work/data/val.lmdb" --out "$work/train"
python - "$work/train/best.pt" pipelines/demo/teacher.pt <<'PY'
import sys

from kdcache.models.checkpoint import load_checkpoint, save_checkpoint

loaded = load_checkpoint(sys.argv[1])  # EMA weights of the best validation point
save_checkpoint(sys.argv[2], loaded.model)
print(f"wrote {sys.argv[2]} ({sum(p.numel() for p in loaded.model.parameters())} parameters)")
PY
