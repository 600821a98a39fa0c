#!/usr/bin/env bash
# Checks what bench/gpu.sh wrote under OUT (its first argument): every run's JSON present and parseable, no
# run that exited non-zero ("!!" in log.txt), the script's last line reached. Prints one line per run.
# Used by `bench/gpu-prepare.sh --check` on CPU and by tests/test_bench_gpu_script.py; after a device call,
# run it on the fetched folder (files_at).
set -uo pipefail
OUT=${1:?usage: bench/gpu-check.sh OUT}
python3 - "$OUT" <<'PY'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
problems = [line for line in log.splitlines() if line.startswith("!!")]
if not log.rstrip().endswith("done"):
    problems.append("log.txt does not end with 'done'")
for name in ("train", "decode", "train-remat-full", "train-chunk4096"):
    path = out / f"{name}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path.name}: {e}")
        continue
    if name == "train" and "reference" not in result:
        problems.append("train.json: no reference run (is .bench/reference_step.py there?)")
    keys = ("tokens_per_second", "mfu", "step_seconds", "speedup_vs_reference")
    print(name, {k: result[k] for k in keys if k in result} or sorted(result)[:8])
if not (out / "trace.json.gz").is_file():
    problems.append("no trace.json.gz (the profile of the train run)")
if problems:
    print("gpu-check: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
    print("--- log.txt ---\n" + log[-4000:], file=sys.stderr)
    sys.exit(1)
print("gpu-check: ok")
PY
