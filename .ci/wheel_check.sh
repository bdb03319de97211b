#!/usr/bin/env bash
# CI: build the wheel, install it into a fresh virtual environment (the base install: no torch),
# and from an empty folder outside the checkout run the main job (mdx-sample), a shipped model
# by name, the evaluator (mdx-eval) and the README's Python example. Nothing may come from the
# repository: the check fails if mdx is imported from anywhere but the new environment.
# Usage: bash .ci/wheel_check.sh            (about 1-2 minutes; most of it installing onnxruntime)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/mdx-wheel-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
max_wheel_mb=30  # the shipped models and data are ~15 MB; more means something unintended got in
start=$SECONDS
step() { echo "wheel check: $* ($((SECONDS - start)) s)"; }
quiet() { "$@" > "$work/log" 2>&1 || { cat "$work/log" >&2; echo "wheel check: failed: $*" >&2; exit 1; }; }

# setuptools builds in build/ and packs whatever build/lib holds, stale files of an earlier build included
rm -rf "$repo/build"
python3.11 -m venv "$work/venv"
py="$work/venv/bin/python"
quiet "$py" -m pip wheel --no-deps -w "$work/dist" "$repo"  # in build isolation: checks build-system.requires
wheel=$(ls "$work"/dist/microdiffusion-*.whl)
size_mb=$(( $(stat -c %s "$wheel") / 1000000 ))
step "built $(basename "$wheel") (${size_mb} MB)"
if (( size_mb > max_wheel_mb )); then
  echo "wheel check: the wheel is ${size_mb} MB, more than ${max_wheel_mb} MB" >&2
  exit 1
fi
quiet "$py" -m pip install "$wheel"
step "installed it with its requirements"

mkdir "$work/run"
cd "$work/run"
export PYTHONNOUSERSITE=1
unset PYTHONPATH
export PATH="$work/venv/bin:$PATH"
"$py" - "$work/venv" <<'EOF'
import importlib.util, sys
import mdx.runtime
where, venv = mdx.runtime.__file__, sys.argv[1]
if not where.startswith(venv):
    sys.exit(f"mdx.runtime imported from {where}, not from the wheel in {venv}")
if importlib.util.find_spec("torch") is not None:
    sys.exit("torch is installed: the base install must not need it")
from mdx.runtime.shipped import classifier_path, real_data_path, shipped_models
print("wheel check: shipped models", ", ".join(shipped_models()), "| classifier", classifier_path().is_file(),
      "| real data", real_data_path().is_file())
EOF

mdx-sample
test -s samples.png
step "mdx-sample wrote samples.png"
mdx-sample --model emoji16-int8 --class food -n 4 --out int8.npz
test -s int8.npz
mdx-eval --model emoji16 -n 18 --json eval.json
test -s eval.json
step "mdx-eval scored the shipped model"

# The README's "Use it from Python" example, verbatim when the README has that section.
"$py" - "$repo/README.md" > example.py <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
section = re.search(r"^## Use it from Python\n(.*?)(?=^## |\Z)", text, re.S | re.M)
blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S) if section else []
print(blocks[0] if blocks else "")
EOF
if [[ ! -s example.py || -z "$(tr -d '[:space:]' < example.py)" ]]; then
  echo "wheel check: the README has no 'Use it from Python' example yet; running the issue's example"
  cat > example.py <<'EOF'
from mdx.runtime import Pipeline
pipe = Pipeline.load("emoji16", provider="auto")
out = pipe(classes=["food"], n=4, steps=20, guidance=5.0, seed=0)
print(out.images.shape, out.images.dtype, out.samples.shape, out.provider)
out.save("food.png")
EOF
fi
"$py" example.py
step "the README's Python example ran"
echo "wheel check: passed in $((SECONDS - start)) s"
