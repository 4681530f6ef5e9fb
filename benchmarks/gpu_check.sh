#!/usr/bin/env bash
# The GPU check in one call on a lent GPU machine (no internet there): install lightly from the carried
# wheel, run the tests that need CUDA, then the quick benchmark. Results go to $OUT when the machine
# sets it (what comes back from it), else to benchmarks/results. Carry data/fashion-mnist and .whl
# (see benchmarks/gpu.py's docstring for how to fill them). Run from the checkout's root:
#     bash benchmarks/gpu_check.sh            # the quick form is sized for 8 minutes on one H200, set-up included
set -u
PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
# lightly is the one package rela needs that the machine lacks; its own dependencies are not imported
# by what rela uses, hence --no-deps (and --no-index: nothing can be downloaded there)
"$PY" -m pip install -q --no-index --no-deps --target /tmp/pylib .whl/*.whl || exit 1
export PYTHONPATH=/tmp/pylib:$PWD  # torch threads as a user gets them: not pinned
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu_check_device.txt"
# the CUDA-only tests (marked cuda; skipped on machines without CUDA), or TESTS="tests/test_x.py ...".
# pytest exits 5 when none is collected.
"$PY" -m pytest -q -rs ${TESTS:--m cuda tests} 2>&1 | tail -40 | tee "$RESULTS/gpu_check_pytest.txt"
tests=${PIPESTATUS[0]}
[ "$tests" = 5 ] && echo "no test is marked cuda yet" | tee -a "$RESULTS/gpu_check_pytest.txt"
# the quick benchmark: writes its results after every run, so a timeout keeps what finished; a fresh
# machine's $OUT starts empty, so RESUME=path/to/gpu_quick-<device>.json (carried) continues a cut-off one
[ -n "${RESUME:-}" ] && cp "$RESUME" "$RESULTS/"
"$PY" benchmarks/gpu.py --quick --data-root data/fashion-mnist --results "$RESULTS" --runs-dir /tmp/bench-gpu "$@"
bench=$?
echo "pytest -m cuda: exit $tests; benchmark: exit $bench"
[ "$bench" = 0 ] && { [ "$tests" = 0 ] || [ "$tests" = 5 ]; }
