#!/usr/bin/env bash
# The whole GPU check in one call, on a machine with a CUDA GPU and no network
# access (PyTorch and Triton preinstalled there):
#
#   1. install invertnet from this working tree, without dependencies;
#   2. run the CUDA tests (every test whose name or marker says cuda);
#   3. run `invertnet bench --device cuda` (GPU-sized workloads, fp32 and bf16
#      autocast, CUDA-event timing, memory from max_memory_allocated) and write
#      bench_cuda.json, the README-style table bench_cuda.rst, the text output
#      bench_cuda.txt (and bench_cuda.png where matplotlib is installed).
#
# Results go to $OUT when it is set (a device runner's output folder), else to
# docs/_static. Environment knobs:
#   PYTHON      the interpreter (default: python)
#   BENCH_ARGS  extra options for invertnet bench, e.g. "--workloads additive-conv
#               --depths 8 128" for a shorter run (default: the full GPU size)
#   SKIP_TESTS  set to 1 to skip step 2
# Exit status: 0 when the install, the tests and the benchmark all succeeded.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
DEST=${OUT:-docs/_static}
mkdir -p "$DEST"
status=0

echo "== environment"
"$PY" - <<'PY' || { echo "gpu_check: PyTorch with CUDA is needed"; exit 2; }
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
PY

echo "== install (no dependencies, no build isolation)"
if ! "$PY" -m pip install --no-deps --no-build-isolation -q . ; then
    echo "gpu_check: pip install failed; running from the working tree (PYTHONPATH)"
fi
# Either way, run this very tree's code (the tests and the benchmark's workers).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import invertnet, sys; print('invertnet', invertnet.__version__, 'from', invertnet.__file__)" || exit 2

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== CUDA tests"
    if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
        "$PY" -m pytest -q -p no:cacheprovider -k cuda -rs 2>&1 | tee "$DEST/gpu_tests.txt"
        rc=${PIPESTATUS[0]}
        # 5: no test selected; anything else but 0 is a failure.
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=1; fi
    else
        echo "gpu_check: pytest or hypothesis is not installed; skipping the tests"
        status=1
    fi
fi

echo "== invertnet bench --device cuda"
plot=()
if "$PY" -c "import matplotlib" 2>/dev/null; then plot=(--plot "$DEST/bench_cuda.png"); fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
"$PY" -m invertnet.bench --device cuda --repeats 5 --no-progress \
    --json "$DEST/bench_cuda.json" --rst "$DEST/bench_cuda.rst" "${plot[@]}" \
    ${BENCH_ARGS:-} 2>&1 | tee "$DEST/bench_cuda.txt"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then status=1; fi
if [ -f "$DEST/bench_cuda.rst" ]; then
    echo "== README table ($DEST/bench_cuda.rst)"
    cat "$DEST/bench_cuda.rst"
fi
exit "$status"
