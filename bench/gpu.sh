#!/usr/bin/env bash
# The prepared GPU check of issue 13, one command on a GPU machine with torch but without network, diffusers or
# datasets:
#     bash bench/gpu.sh > gpu.log 2>&1   # one "GPU ..." line per figure; all parts take over 10 minutes on one
#                                        # H100 (docs/benchmarks.md splits them into calls); --deadline_s skips the tail
#     bash bench/gpu.sh --only data train --deadline_s 240    # some parts only
#     ... --logs DIR    # keep each train.py run's whole output (the stacks of one killed at its limit included)
# Send the output to a file, not through a pipe: a run stopped by a time limit keeps what it printed.
# It installs diffusers, datasets and their pure-Python dependencies from wheels in .gpu_wheels/ (git-ignored), made
# on a machine with network by (diffusers and datasets at their versions in constraints.txt):
#     pip download --no-deps -d .gpu_wheels diffusers==0.42.1 datasets==5.2.0 dill multiprocess xxhash regex \
#         importlib_metadata zipp      # plus --python-version 3.X --only-binary=:all: for the GPU machine's Python
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.gpu_wheels}
if ! python -c "import diffusers, datasets" 2>/dev/null; then
    python -m pip install -q --no-index --no-deps --find-links "$WHEELS" diffusers datasets dill multiprocess xxhash regex \
        importlib_metadata zipp
fi
# The package as setup.py lays it out (pipelines/ is ddpm_hf.pipelines), without installing anything.
PKG=$(mktemp -d)
mkdir "$PKG/ddpm_hf" && ln -s "$PWD"/ddpm_hf/* "$PKG/ddpm_hf/" && ln -s "$PWD/pipelines" "$PKG/ddpm_hf/pipelines"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python bench/gpu.py "$@"
# the CUDA-only tests, within CUDA_TESTS_S seconds (0: none; 33 tests, about 250 s on one H100 with their
# compilations); -P: the cwd's ddpm_hf (no pipelines) not first
if [ "${CUDA_TESTS_S:-300}" != 0 ] && python -c "import pytest" 2>/dev/null; then
    # their whole output into a file ($OUT's on the device machine, which comes back even after a time limit's kill);
    # -v: each outcome as it comes; stopped at the limit by SIGINT, pytest still prints the summary of those run
    CUDA_LOG="${OUT:-$PKG}/cuda_tests.log"
    timeout -s INT -k 20 "${CUDA_TESTS_S:-300}" python -P -m pytest -p no:cacheprovider -o addopts="" -v -rA \
        tests/test_fast_path.py \
        tests/faults/test_training_faults.py tests/faults/test_out_of_memory.py tests/faults/test_stopped_samples.py \
        -k "fp16 or upsampling or layouts \
        or ema or gpu_matches or never_reads or group_norm or sampling or skipped_on_the_device or counted_late \
        or on_the_gpu or accumulat or dropout_masks" > "$CUDA_LOG" 2>&1 \
        || echo "CUDA tests: pytest exited with status $? (its output: $CUDA_LOG)"
    # the summary (-rA), else (killed before it) the outcomes as they came
    grep -E "^(PASSED|FAILED|SKIPPED|ERROR) |^=+ .*(passed|failed|error|skipped)" "$CUDA_LOG" \
        || grep -E " (PASSED|FAILED|SKIPPED|ERROR)" "$CUDA_LOG" || echo "CUDA tests: no outcome in $CUDA_LOG"
fi
