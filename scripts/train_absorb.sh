#!/usr/bin/env bash
# How the shipped gradient compressor (src/dynalora/checkpoints/absorb) was made, on the 2-core CPU machine
# (~35 minutes of training). Train seeds / split only; validation seeds / split for the curve.
# Usage: scripts/train_absorb.sh [work folder]   (default /tmp/absorb-train)
set -euo pipefail
D=${DYNALORA:-dynalora}
WORK=${1:-/tmp/absorb-train}
mkdir -p "$WORK" && cd "$WORK"
$D data absorb --kind locality --split train --count 3000 --out loc_train.jsonl
$D data absorb --kind facts --split train --count 400 --words 150 --out facts_train.jsonl
$D data absorb --kind needle --split train --count 400 --words 120 --out needle_train.jsonl
$D data absorb --kind locality --split validation --count 32 --out loc_val.jsonl
$D data absorb --kind facts --split validation --count 6 --words 150 --out facts_val.jsonl
cat loc_val.jsonl facts_val.jsonl > validation.jsonl
$D train absorb --data loc_train.jsonl facts_train.jsonl needle_train.jsonl --validation validation.jsonl \
    --out-dir "$WORK/run" --compressor gradient --rank 16 --steps 400 --time-limit 35 --max-chunks 3 \
    --distill-weight 0 --gold-weight 1
rm -rf "$WORK"/run/teacher_*.pt "$WORK"/run/resume
ls -la "$WORK/run"
