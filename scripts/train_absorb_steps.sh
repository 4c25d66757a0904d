#!/usr/bin/env bash
# Meta-learned step sizes for the distill writer (README, Absorb): two runs on 32 train-seed documents
# (~22 minutes each on the 2-core CPU), then both against the constant step size on 3 validation-seed
# documents (~8 minutes each). Usage: scripts/train_absorb_steps.sh [work folder]
set -euo pipefail
D=${DYNALORA:-dynalora}
WORK=${1:-/tmp/absorb-steps}
mkdir -p "$WORK"
$D data absorb --kind facts --split train --count 48 --words 150 --out "$WORK/facts_train.jsonl"
$D data absorb --kind facts --split validation --count 6 --words 150 --out "$WORK/facts_val.jsonl"
# gold answers + unrelated questions (locality, weight 1), scored after 1, 2, 4 and 8 steps
$D train absorb-steps --data "$WORK/facts_train.jsonl" --out-dir "$WORK/steps_locality" --documents 32 --steps 8 \
    --score-steps 1 2 4 8 --locality-weight 1
# gold answers alone, scored after 4 and 8 steps
$D train absorb-steps --data "$WORK/facts_train.jsonl" --out-dir "$WORK/steps_gold" --documents 32 --steps 8 \
    --score-steps 4 8 --locality-weight 0
for run in constant steps_locality steps_gold; do
    flags=(); [ "$run" = constant ] || flags=(--step-sizes "$WORK/$run")
    $D eval absorb --data "$WORK/facts_val.jsonl" --absorber distill --max-docs 3 --methods full_context dynalora \
        --steps 2 4 8 --locality 12 "${flags[@]}" --out "results/validation_absorb_steps_$run.json"
done
