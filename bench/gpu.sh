#!/usr/bin/env bash
# Every GPU check and timing of docs/scale.md in one run, for a lent GPU machine (about 8 minutes on one H100).
#
#   bash bench/gpu.sh --prepare   # here, once: .gpu/ (git-ignored) gets the pyvene wheel and the embedded
#                                 # model's tokenizer and config files (the weights stay: too big to carry)
#   bash bench/gpu.sh             # there, carrying .gpu: CUDA bit-identity tests, then the benchmark tables,
#                                 # each also written to $OUT (default bench_gpu_out/)
#
# The GPU machine's python3 has torch, transformers and accelerate; cfgen runs from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  py=${PYTHON:-.venv/bin/python}
  mkdir -p .gpu/tokenizer
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
  "$py" -m pip download -q --no-deps --only-binary=:all: -d .gpu pyvene==0.1.8
  "$py" - <<'PY'
import shutil
from cfgen.models import default_model_dir
src = default_model_dir()
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
             "generation_config.json"):
    if (src / name).exists():
        shutil.copy(src / name, ".gpu/tokenizer/")
PY
  du -sh .gpu
  exit
fi
out=${OUT:-bench_gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
tok=.gpu/tokenizer
{ nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
  transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_noise.py tests/test_posterior.py tests/test_compiled.py \
  2>&1 | tee "$out/cuda_tests.txt"
python3 bench/posterior.py --device cuda --model embedded-shapes --tokenizer $tok --repeats 5 \
  2>&1 | tee "$out/posterior_v49152.txt"
python3 bench/posterior.py --device cuda --model llama3-8b-shapes --tokenizer $tok --repeats 5 \
  2>&1 | tee "$out/posterior_v128256.txt"
python3 bench/generate.py --device cuda --model llama3-8b-shapes --tokenizer $tok --batches 1,8,64 --only pair \
  2>&1 | tee "$out/generate_8b.txt"
