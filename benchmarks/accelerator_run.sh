#!/usr/bin/env bash
# Every figure the docs still lack from an accelerator, in one run of at
# most BUDGET_S seconds (default 570), most important first:
#
#   machine   the GPU, driver and versions
#   bench     python -m benchmarks.bench --size large: flat path, tree path,
#             optax, PyTorch fused and foreach, bitsandbytes' Adam8bit,
#             bfloat16 and int8 moments, skip_nonfinite, telemetry, offload
#   cost      benchmarks/compiled_cost.py gpt2_small: kernels and bytes of
#             the compiled step, on this compiler
#   layouts   benchmarks/tree_layouts.py gpt2_small many_1000x64k: the
#             tree-path candidates against the flat path
#   doctor    benchmarks/doctor.py gpt2_small many_1000x64k: the numerics
#             doctor (every 10 steps, every step) and skip_spikes against
#             the plain step, tree path and flat path
#   suite     the test suite on this device, with its counts (given what
#             time is left; interrupted at the deadline, it still prints
#             the counts of the tests that ran)
#
#   bash benchmarks/accelerator_run.sh                 # all of it
#   bash benchmarks/accelerator_run.sh bench layouts   # some stages
#
# Results go to $OUT (default ./accelerator-results): one log per stage,
# large.json, large.png and summary.txt. No package is installed from an
# index: jadam runs from this checkout, and a folder of wheels named by
# WHEELS (default .whl), if present, is installed first (bitsandbytes for
# the Adam8bit row, on a machine without a package index).
set -u
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${BUDGET_S:-570}
out=${OUT:-accelerator-results}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# (The benchmark and the suite start JAX without preallocating the GPU
# themselves, so that PyTorch's rows and the suite's subprocesses have room.)

wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/accelerator-site "$wheels"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/accelerator-site"
fi

left() { echo $(( budget - ($(date +%s) - start) )); }

# stage NAME SECONDS COMMAND...: run with at most SECONDS (and never past
# the budget), output in $out/NAME.log, a line in summary.txt.
stage() {
  local name=$1 limit=$2 t0 status remaining
  shift 2
  remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    echo "$name: not run, the budget is spent" | tee -a "$out/summary.txt"
    return
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "=== $name (at most $limit s)"
  t0=$(date +%s)
  # SIGINT first: pytest and the benchmark then print what they have.
  timeout -s INT -k 15 "$limit" "$@" > "$out/$name.log" 2>&1
  status=$?
  echo "$name: exit $status in $(( $(date +%s) - t0 )) s" \
    | tee -a "$out/summary.txt"
  tail -n 40 "$out/$name.log"
}

stages=" $* "
run_stage() {
  if [ "$stages" = "  " ] || [[ "$stages" == *" $1 "* ]]; then stage "$@"; fi
}

# QUICK=1: tiny trees and one test file, to try the script on a CPU.
quick=()
suite=(tests)
if [ -n "${QUICK:-}" ]; then
  quick=(--quick)
  suite=(tests/test_bench.py)
fi
parallel=()
if "$python" -c "import xdist" 2>/dev/null; then
  parallel=(-n "${WORKERS:-8}")
fi

: > "$out/summary.txt"
run_stage machine 30 bash -c "nvidia-smi || true; $python - <<'EOF'
import importlib.metadata as m, platform, jax
print('Python', platform.python_version())
for name in ['jax', 'jaxlib', 'optax', 'chex', 'flax', 'torch',
             'bitsandbytes', 'pytest', 'hypothesis']:
  try:
    print(name, m.version(name))
  except m.PackageNotFoundError:
    print(name, 'not installed')
print(jax.default_backend(), jax.devices())
EOF"
# Rows that do not fit together run in groups, in this order: telemetry
# next to the plain flat step, so that on llama_1b (two or three rows a
# group on one H200) its ratio to the plain step is measured interleaved.
run_stage bench 300 "$python" -m benchmarks.bench --size large \
  --impls jadam,jadam_telemetry,jadam_tree,optax,torch_fused,torch_foreach,bnb_adam8bit,jadam_bf16,jadam_int8,jadam_skip_nonfinite,jadam_offload \
  --json "$out/large.json" --plot "$out/large.png" "${quick[@]}"
run_stage cost 60 "$python" benchmarks/compiled_cost.py gpt2_small
run_stage layouts 100 "$python" benchmarks/tree_layouts.py \
  gpt2_small many_1000x64k "${quick[@]}"
run_stage doctor 120 "$python" benchmarks/doctor.py \
  --trees gpt2_small many_1000x64k --repeats 7 "${quick[@]}"
# -n: 8 workers (pytest-xdist, where installed); -v: one line per test as
# it ends, so that an interrupted run still says which ran;
# -p no:cacheprovider: the checkout may be read-only.
run_stage suite 600 "$python" -m pytest -v -p no:cacheprovider \
  "${parallel[@]}" --junitxml="$out/junit.xml" "${suite[@]}"
echo "=== summary ($(( $(date +%s) - start )) s)"
cat "$out/summary.txt"
