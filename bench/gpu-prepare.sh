#!/usr/bin/env bash
# Prepares the two folders bench/gpu.sh needs on the lent GPU machine (issue 31), from the repository root:
#   .whl    wheels of what `palm bench` imports that the GPU image lacks (Python 3.12, x86-64, JAX with flax,
#           optax, orbax and numpy, but no pydantic or PyYAML): pydantic and its dependencies, PyYAML; the
#           versions are uv.lock's, resolved for CPython 3.12 on manylinux x86-64 (`uv tree --frozen`)
#   .bench  a copy of ../shared/bench/reference_step.py (the plain JAX step `--reference` runs)
# Both are ignored by git (.gitignore) and carried: run(command="bash bench/gpu.sh", carry=[".whl", ".bench"]).
#   bash bench/gpu-prepare.sh            # then, to try the device script itself on CPU first:
#   bash bench/gpu-prepare.sh --check    # also runs bench/gpu.sh on CPU (tiny spec) with a Python that has no
#                                        # pydantic/PyYAML, so the wheels are installed as on the device
# Environment: ROOTS (the packages whose lock subtrees are fetched), PIP (the pip to download with),
# SHARED (../shared by default), CHECK_PYTHON (the interpreter for --check: one without pydantic).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOTS=${ROOTS:-pydantic pyyaml}
PIP=${PIP:-python3 -m pip}
SHARED=${SHARED:-../shared}

# 1. The packages: every node of the roots' dependency trees in uv.lock, for CPython 3.12 on x86-64 Linux.
packages=()
for root in $ROOTS; do packages+=(--package "$root"); done
mapfile -t pins < <(uv tree --frozen --no-dedupe --python-version 3.12 --python-platform x86_64-manylinux_2_17 \
  "${packages[@]}" | sed -E 's/^[^[:alnum:]]*//' | awk '$2 ~ /^v[0-9]/ {print $1 "==" substr($2, 2)}' | sort -u)
for root in $ROOTS; do
  printf '%s\n' "${pins[@]}" | grep -qi "^$root==" || { echo "gpu-prepare: $root is not in uv.lock" >&2; exit 1; }
done
echo "gpu-prepare: ${pins[*]}"

# 2. Their wheels (binary only: the device has no network and may have no compiler).
rm -rf .whl && mkdir -p .whl
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
# one wheel per pin, or stop here rather than on the device
for pin in "${pins[@]}"; do
  name=$(echo "${pin%%==*}" | tr 'A-Z-' 'a-z_'); version=${pin##*==}
  ls .whl | tr 'A-Z' 'a-z' | grep -q "^${name}-${version}-" \
    || { echo "gpu-prepare: no wheel for $pin in .whl" >&2; exit 1; }
done

# 3. The reference step.
mkdir -p .bench
cp "$SHARED/bench/reference_step.py" .bench/reference_step.py
for folder in .whl .bench; do
  git check-ignore -q "$folder" || { echo "gpu-prepare: $folder must be ignored by git (.gitignore)" >&2; exit 1; }
done
echo "gpu-prepare: $(ls .whl | wc -l) wheels in .whl, .bench/reference_step.py"

# 4. Optionally, the device script on CPU, as the device will run it (a typo costs the one device call).
if [ "${1:-}" = "--check" ]; then
  check_python=${CHECK_PYTHON:-python3}
  if "$check_python" -c "import pydantic" 2>/dev/null; then
    echo "gpu-prepare: warning: $check_python has pydantic, so gpu.sh will not install .whl (set CHECK_PYTHON)" >&2
  fi
  out=$(mktemp -d)
  # gpu.sh calls python3: put the interpreter's own directory first (a venv finds its packages only when
  # called from its bin/, not through a link elsewhere)
  bin=$(dirname "$(command -v "$check_python")")
  [ -x "$bin/python3" ] || { echo "gpu-prepare: no python3 beside $check_python" >&2; exit 1; }
  PATH=$bin:$PATH OUT=$out SPEC=${SPEC:-specs/tiny.yaml} STEPS=${STEPS:-2} RUN_TIMEOUT=${RUN_TIMEOUT:-600} \
    JAX_PLATFORMS=cpu bash bench/gpu.sh
  echo "gpu-prepare: gpu.sh wrote $out"
  bash bench/gpu-check.sh "$out"
fi
