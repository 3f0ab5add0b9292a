#!/usr/bin/env bash
# One call on the GPU machine: install what its image lacks from carried wheels, print the GPU,
# run the GPU tests, then benchmarks/throughput.py (eager, then with --compile if time is left).
# Logs and JSON go to $OUT (the device tool brings them back).
#
# The GPU image (Python 3.12, torch 2.11, torchvision 0.26, timm, accelerate, safetensors, numpy,
# pillow, pyyaml, tqdm, lightning-utilities, pytest, ...) lacks lightly and faiss-cpu, which
# sslkit imports (its losses and heads: lightly; sslkit.eval.knn: faiss), and sslkit itself
# (used from the repo via PYTHONPATH). lightly's other requirements are either there or not
# imported by what sslkit and these benchmarks use (hydra-core, pytorch_lightning: not imported;
# checked by importing sslkit, lightly.{loss,models,transforms,utils} and benchmarks/throughput.py
# with pydantic, wandb, hydra, omegaconf, kornia hidden). Nothing can be downloaded there.
#
# Prepare the wheels HERE, once, in the repo root (about 19 MiB; list what a wheel needs with
# `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`):
#   echo /.whl/ >> .git/info/exclude     # .gitignore also ignores /.whl/
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl"
#   python3 -m pip download $P lightly==1.6.0
#   python3 -m pip download $P faiss-cpu==1.15.1
#   ls .whl   # faiss_cpu-1.15.1-cp310-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl, lightly-1.6.0-py3-none-any.whl
# Then the device tool's run call: carry [".whl"], command "bash benchmarks/gpu_check.sh",
# timeout_s 590. The script keeps itself under GPU_CHECK_BUDGET seconds (default 560).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-560}
SITE=${GPU_CHECK_SITE:-/tmp/site}
ARGS=${THROUGHPUT_ARGS:-}  # e.g. "--settings resnet50 --steps 5": passed to both benchmark runs
left() { echo $((BUDGET - SECONDS)); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing the carried wheels failed: carry .whl (see the top of this script)"; exit 1; }
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1

{
    nvidia-smi
    python3 -c "import sys, torch, torchvision, timm, accelerate, lightly, faiss; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'accelerate', \
accelerate.__version__, 'lightly', lightly.__version__, 'faiss', faiss.__version__, 'cuda', torch.cuda.is_available())"
    nproc
} 2>&1 | tee "$OUT/env.log"

tests=()
# the CUDA-only tests: no host sync in any method's step, optimisers, nvjpeg decoding
for f in tests/test_hot_path.py tests/test_optim.py tests/test_decode.py; do
    if [[ -f $f ]]; then tests+=("$f"); else echo "($f not in this tree: skipped)"; fi
done
if ((${#tests[@]})); then
    timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$OUT/pytest.log"
    echo "pytest exit ${PIPESTATUS[0]} ($SECONDS s so far)"
fi

# Eager first: the numbers that matter. Leave about 200 s for the compiled run when it can have them.
eager_limit=$(($(left) - 200))
((eager_limit < 240)) && eager_limit=$(($(left) - 10))
# -k: the trainer turns the first SIGTERM into a checkpoint and a clean stop, and the benchmark goes on
timeout -k 10 "$eager_limit" python3 benchmarks/throughput.py $ARGS --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
echo "throughput exit ${PIPESTATUS[0]} ($SECONDS s so far)"

# train.compile=true: (a) and (b) only, lightly's side does not change. Compiling takes a while;
# whatever settings finish are in the JSON (written after each setting).
if (($(left) > 100)); then
    timeout -k 10 $(($(left) - 15)) python3 benchmarks/throughput.py $ARGS --compile --modes a,b \
        --json "$OUT/throughput_compile.json" 2>&1 | tee "$OUT/throughput_compile.log"
    echo "throughput --compile exit ${PIPESTATUS[0]} ($SECONDS s so far)"
else
    echo "no time left for --compile ($SECONDS s so far)"
fi
