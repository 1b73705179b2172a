#!/usr/bin/env bash
# One prepared accelerator check of the alignax kernels (< 8 minutes on one H200):
#   (a) attention implementations (chunked, xla, cudnn, pallas_gpu) against the dense oracle,
#       values and gradients, at a few shapes;
#   (b) their forward + backward speed at Llama-3.1-8B head shapes;
#   (c) the log-prob kernels: benchmarks/logprob_speed.py at (16384, 4096, 131072) bf16 and a
#       values check of impl="pallas" against impl="reference";
#   (d) attention temporaries at real sizes from memory_analysis();
#   (e) MFU of a full training step (benchmarks/train_step_mfu.py: SFT + AdamW on a ~1B Llama built
#       on the device, batch 8 x 2048, bf16 compute / fp32 master weights; about 90-120 s).
# Results: $OUT/device_check.json, device_check_table.txt, logprob_speed.json and the logs (7 files,
# under the 8 that come back from a device run); the short table is printed last. Exit status 1 if
# a value check failed, a section raised, or nothing was checked.
#
# The training step imports alignax.train, which needs grain; the device image has none. Carry its
# wheels in .whl/ (see BUILD.md: grain, array-record, portpicker for cp312 manylinux x86_64) and
# this script installs them when `import grain` fails.
#
#   bash benchmarks/device_check.sh                # on a GPU machine
#   bash benchmarks/device_check.sh --cpu-dry-run  # the same script at tiny sizes on a CPU
set -euo pipefail

dry_run=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) dry_run=1 ;;
    *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$repo/device_check_out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# The repository is not installed on a fresh machine: stage the package as it installs
# (pyproject.toml maps kernels/ to alignax.kernels) and put it first on the path.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r "$repo/alignax" "$stage/alignax"
rm -rf "$stage/alignax/kernels"
cp -r "$repo/kernels" "$stage/alignax/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"

if [[ $dry_run == 1 ]]; then
  export JAX_PLATFORMS=cpu
  check_args=(--cpu-dry-run)
  logprob_args=(--n 256 --d 64 --v 1024 --dtype bfloat16 --iters 2)
else
  # Install a CUDA jax only when the one there has no GPU backend (the device image ships one).
  if ! "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
    echo "jax has no GPU backend here: installing jax[cuda12]" >&2
    "$py" -m pip install -q "jax[cuda12]" || {
      echo "could not install jax[cuda12] (no registry reachable?); carry wheels instead" >&2
      exit 1
    }
  fi
  check_args=()
  logprob_args=(--n 16384 --d 4096 --v 131072 --dtype bfloat16)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" || true
fi
if ! "$py" -c 'import grain' 2>/dev/null; then
  if compgen -G "$repo/.whl/*.whl" > /dev/null; then
    echo "no grain here: installing the carried wheels in .whl/" >&2
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$stage/site" "$repo"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:$stage/site"
  else
    echo "no grain here and no .whl/ wheels: the train-step section (e) will fail to import" >&2
  fi
fi
"$py" -c 'import jax; print("jax", jax.__version__, jax.default_backend(), jax.devices())' \
  | tee "$out/jax.txt"

status=0
echo "== (c) log-prob speed: benchmarks/logprob_speed.py ${logprob_args[*]}" >&2
if ! timeout 150 "$py" "$repo/benchmarks/logprob_speed.py" "${logprob_args[@]}" \
    > "$out/logprob_speed.json" 2> "$out/logprob_speed.log"; then
  echo "logprob_speed.py failed; see logprob_speed.log" >&2
  tail -n 20 "$out/logprob_speed.log" >&2
  status=1
fi
"$py" - "$out/logprob_speed.json" <<'EOF' || true
import json, sys
try:
  report = json.load(open(sys.argv[1]))
except (OSError, ValueError) as error:
  print(f"logprob_speed: no result ({error})")
  sys.exit()
print("logprob_speed:", json.dumps(report)[:1500])
EOF

# device_check.py prints its table on stdout (also written to device_check_table.txt) and exits 1
# when a value check failed or a section raised; the table is printed last either way.
echo "== (a, b, d, e) attention values, speed, memory; log-prob values; train-step MFU" >&2
# 150 + 390 s: the whole script ends inside one 10-minute device command (timeout_s=560).
if ! timeout 390 "$py" "$repo/benchmarks/device_check.py" --budget-s 370 --out "$out" \
    "${check_args[@]}" \
    > "$stage/table.txt" 2> "$out/device_check.log"; then
  tail -n 30 "$out/device_check.log" >&2
  status=1
fi
if [[ $status != 0 ]]; then
  echo "device_check: FAILED (exit 1); see device_check.log and logprob_speed.log under $out"
fi
cat "$stage/table.txt"
exit $status
