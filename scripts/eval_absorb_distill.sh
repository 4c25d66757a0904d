#!/usr/bin/env bash
# The distill writer's README numbers (test seeds; its defaults were chosen on 3 validation-seed documents,
# `dynalora data absorb --kind facts --split validation --count 6 --words 150`, 33 questions).
# About 25 minutes on the 2-core CPU machine. Usage: scripts/eval_absorb_distill.sh [work folder]
set -euo pipefail
D=${DYNALORA:-dynalora}
WORK=${1:-/tmp/absorb-eval}
mkdir -p "$WORK"
$D data absorb --kind facts --split test --count 8 --words 150 --out "$WORK/facts_test.jsonl"
$D data absorb --kind facts --split test --count 9 --words 150 --out "$WORK/facts_test9.jsonl"
# quality vs steps, cost in chunk prefills, locality (24 unrelated questions)
$D eval absorb --data "$WORK/facts_test.jsonl" --absorber distill --steps 0 1 2 4 8 16 --locality 24 \
    --methods full_context no_context dynalora --out results/eval_absorb_distill.json
# locality, the two ways: the relevance gate, and the locality KL term
$D eval absorb --data "$WORK/facts_test.jsonl" --absorber distill --locality 24 --relevance-gate \
    --methods dynalora --out results/eval_absorb_distill_gate.json
$D eval absorb --data "$WORK/facts_test.jsonl" --absorber distill --locality 24 --locality-weight 1 \
    --methods dynalora --out results/eval_absorb_distill_locality_kl.json
# a long conversation: 9 documents absorbed one after another into one memory, then questions about each
$D eval absorb --data "$WORK/facts_test9.jsonl" --absorber distill --sequence 9 --methods no_context \
    --out results/eval_absorb_distill_sequence.json
# validation (3 documents): probes the base model writes itself, against the default's 0.273 at 8 steps
# (results/validation_absorb_steps_constant.json, from scripts/train_absorb_steps.sh)
$D data absorb --kind facts --split validation --count 6 --words 150 --out "$WORK/facts_val.jsonl"
$D eval absorb --data "$WORK/facts_val.jsonl" --absorber distill --max-docs 3 --methods full_context dynalora \
    --steps 8 --locality 12 --generated 3 --out results/validation_absorb_generated_probes.json
# validation (3 documents in 128-token chunks): the window text after each chunk as a probe, off and on
for f in 0 64; do
    $D eval absorb --data "$WORK/facts_val.jsonl" --absorber distill --max-docs 3 --methods full_context dynalora \
        --steps 8 --chunk-tokens 128 --following-tokens $f --out "results/validation_absorb_following_$f.json"
done
# pass keys at 4x a 256-token window, streamed through it (10 depths; ~7 minutes)
$D eval absorb --needle --window 256 --needle-multiples 4 --absorber distill --out results/eval_absorb_needle_distill.json
