#!/usr/bin/env bash
# How the shipped mix gate (src/dynalora/checkpoints/mix) was made on the 2-core CPU machine, and its evaluation: fact
# documents of validation seeds the compressor never saw (on its own training documents its memory is far
# more useful than on new ones) and the library domains' train split for training; test seeds and the test
# split for the evaluation. Uses the shipped shift network and absorb compressor.
# Usage: scripts/train_mix.sh [work folder]   (default /tmp/mix-data)
set -euo pipefail
D=${DYNALORA:-dynalora}
WORK=${1:-/tmp/mix-data}
mkdir -p "$WORK"
$D data absorb --kind facts --split validation --seed-offset 100 --count 40 --words 150 --out "$WORK/facts_mix.jsonl"
$D data absorb --kind facts --split test --count 12 --words 150 --out "$WORK/facts_test.jsonl"
$D train mix --facts "$WORK/facts_mix.jsonl" --out-dir src/dynalora/checkpoints/mix --steps 200
$D eval mix --facts "$WORK/facts_test.jsonl" --mix src/dynalora/checkpoints/mix --out results/eval_mix.json
