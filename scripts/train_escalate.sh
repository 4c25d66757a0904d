#!/usr/bin/env bash
# How the shipped escalate checkpoint (src/dynalora/checkpoints/escalate: level 2 over the shift network + the <|think|> row)
# was made on the 2-core CPU machine, and its evaluation. Library domains' train split for training, validation
# split for the think threshold, test split for the evaluation.
set -euo pipefail
D=${DYNALORA:-dynalora}
# 240 steps with validation every 30 (the step with the lowest validation NLL, 30, is kept); 29 min on 2 CPU cores.
$D train escalate --out-dir src/dynalora/checkpoints/escalate --steps 240 --examples-per-domain 300 --validate-every 30
$D eval escalate --escalate src/dynalora/checkpoints/escalate --split test --per-domain 20 --out results/eval_escalate.json
