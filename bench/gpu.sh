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
#     pip download --no-deps -d .gpu_wheels diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#         xxhash regex      # plus --python-version 3.X --only-binary=:all: for the GPU machine's Python
# (dill and multiprocess pinned: datasets 5.2.0 takes dill<0.4.2 and multiprocess<0.70.20 only.)
# CALL_S: the device call's time limit in seconds (its timeout_s), when there is one: the CUDA tests then get what is
# left of it, less a margin for their summary, and at most CUDA_TESTS_S.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.gpu_wheels}
PY=${PYTHON:-python3}  # the device image's python3 holds its torch
# The packages the image lacks, into a folder of their own (--target: the image's environment is left as it is and
# nothing of it is upgraded); xxhash and regex only where the image has none.
SITE=$(mktemp -d)
if ! $PY -c "import diffusers, datasets" 2>/dev/null; then
    MISSING="diffusers datasets dill multiprocess"
    for name in xxhash regex; do $PY -c "import $name" 2>/dev/null || MISSING="$MISSING $name"; done
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" --find-links "$WHEELS" \
        $MISSING
fi
# The package as setup.py lays it out (pipelines/ is ddpm_hf.pipelines), without installing anything.
PKG=$(mktemp -d)
mkdir "$PKG/ddpm_hf" && ln -s "$PWD"/ddpm_hf/* "$PKG/ddpm_hf/" && ln -s "$PWD/pipelines" "$PKG/ddpm_hf/pipelines"
export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
# a failure of the benchmark (said) does not keep the CUDA tests from running
$PY bench/gpu.py "$@" || echo "GPU bench/gpu.py exited with status $?"
# the CUDA-only tests, within CUDA_TESTS_S seconds (0: none; 33 tests, about 250 s on one H100 with their
# compilations), and within what is left of CALL_S; -P: the cwd's ddpm_hf (no pipelines) not first
TESTS_S=${CUDA_TESTS_S:-300}
if [ -n "${CALL_S:-}" ] && [ "$TESTS_S" != 0 ]; then
    TESTS_S=$(( CALL_S - SECONDS - 45 < TESTS_S ? CALL_S - SECONDS - 45 : TESTS_S ))
    [ "$TESTS_S" -gt 20 ] || { echo "CUDA tests: skipped, $(( CALL_S - SECONDS )) s left of CALL_S"; TESTS_S=0; }
fi
if [ "$TESTS_S" != 0 ] && $PY -c "import pytest" 2>/dev/null; then
    # their whole output into a file ($OUT's on the device machine, which comes back even after a time limit's kill);
    # -v: each outcome as it comes; stopped at the limit by SIGINT, pytest still prints the summary of those run.
    # The files whose tests have not yet run on a GPU since they changed first: a limit cuts the last ones.
    CUDA_LOG="${OUT:-$PKG}/cuda_tests.log"
    echo "CUDA tests: within $TESTS_S s"
    timeout -s INT -k 20 "$TESTS_S" $PY -P -m pytest -p no:cacheprovider -o addopts="" -v -rA \
        tests/faults/test_stopped_samples.py tests/faults/test_out_of_memory.py tests/faults/test_training_faults.py \
        tests/test_fast_path.py \
        -k "fp16 or upsampling or layouts \
        or ema or gpu_matches or never_reads or group_norm or sampling or skipped_on_the_device or counted_late \
        or on_the_gpu or accumulat or dropout_masks" > "$CUDA_LOG" 2>&1 \
        || echo "CUDA tests: pytest exited with status $? (its output: $CUDA_LOG)"
    # the summary (-rA), else (killed before it) the outcomes as they came
    grep -E "^(PASSED|FAILED|SKIPPED|ERROR) |^=+ .*(passed|failed|error|skipped)" "$CUDA_LOG" \
        || grep -E " (PASSED|FAILED|SKIPPED|ERROR)" "$CUDA_LOG" || echo "CUDA tests: no outcome in $CUDA_LOG"
fi
