#!/bin/bash
# The CUDA figures of bench/README.md, on a GPU machine with no network (the lent one):
# the CUDA tests (tiny models against transformers, recorded graphs against eager
# decode), then `python -m bench --engines cuda` on SmolLM2-135M and Qwen2.5-0.5B
# shapes with random weights. Made beforehand, where the GGUFs are:
#   python -m bench.modeldir header smollm2 .gpu/smollm2
#   python -m bench.modeldir header qwen0.5b .gpu/qwen0.5b
#   pip download --no-deps ... -d .gpu/whl gguf   (what fermi needs beyond that machine's packages)
# Results go to $OUT (default /tmp/out): tests.txt, cuda-MODEL.{md,json,log}.
set -x
export PYTHONUNBUFFERED=1 FERMI_CACHE=/tmp/fermi-cache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
[ -n "$NO_INSTALL" ] || python3 -m pip install -q --no-index --no-deps --no-build-isolation .gpu/whl/*.whl -e . 2>&1 | tail -3
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_model_math.py tests/test_sampler.py -k "not mlx" \
  2>&1 | tee "$OUT/tests.txt" | tail -25
for m in ${MODELS:-smollm2 qwen0.5b}; do
  rm -rf "/tmp/m/$m" && mkdir -p /tmp/m && cp -r ".gpu/$m" "/tmp/m/$m"
  python3 -m bench.modeldir fill "/tmp/m/$m" 2>&1 | tail -1
  timeout "${BENCH_S:-300}" python3 -m bench --model "/tmp/m/$m" --engines "${ENGINES:-cuda}" --runs "${RUNS:-3}" \
    --tokens "${TOKENS:-128}" --prefill-tokens "${PREFILL:-400}" --no-cold --no-warm-start --timeout "${WORKER_S:-200}" \
    --markdown --json "$OUT/cuda-$m.json" > "$OUT/cuda-$m.md" 2> "$OUT/cuda-$m.log"
  cat "$OUT/cuda-$m.md"; grep -i "error\|Traceback" "$OUT/cuda-$m.log" | head -20
done
