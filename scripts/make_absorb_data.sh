#!/usr/bin/env bash
# The training and validation documents behind checkpoints/absorb (train seeds / split; validation
# seeds / split), gzipped into .gpu/data for scripts/gpu_train_absorb.sh. Needs the BIG-Bench cache
# (`dynalora data fetch --bigbench`) for the reading passages.
set -euo pipefail
D=${DYNALORA:-dynalora}
mkdir -p .gpu/data && cd .gpu/data
$D data absorb --kind facts --split train --count 4000 --words 150 --out facts.jsonl
$D data absorb --kind needle --split train --count 500 --words 80 --out needle1.jsonl
$D data absorb --kind needle --split train --count 500 --words 200 --seed-offset 500 --out needle2.jsonl
$D data absorb --kind needle --split train --count 500 --words 340 --seed-offset 1000 --out needle3.jsonl
$D data absorb --kind reading --split train --count 3000 --out reading.jsonl
cat facts.jsonl needle1.jsonl needle2.jsonl needle3.jsonl reading.jsonl > train.jsonl
$D data absorb --kind facts --split validation --count 60 --words 150 --out vf.jsonl
$D data absorb --kind needle --split validation --count 20 --words 200 --out vn.jsonl
$D data absorb --kind reading --split validation --count 30 --out vr.jsonl
cat vf.jsonl vn.jsonl vr.jsonl > validation.jsonl
rm facts.jsonl needle?.jsonl reading.jsonl vf.jsonl vn.jsonl vr.jsonl
gzip -f train.jsonl validation.jsonl
