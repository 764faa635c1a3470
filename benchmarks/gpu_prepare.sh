#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a lent GPU machine (benchmarks/README.md, "gpu_check.py"), in
# .whl/ (ignored by git): recipekit itself, and the dependencies that machine's Python 3.12 lacks, at the
# versions installed here. Run it with recipekit's venv active.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
pins=$(python - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in
               ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "blake3")))
PY
)
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086  # word splitting of $platforms and $pins is meant
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl $pins
python -m pip wheel -q --no-deps --no-build-isolation . -w .whl
ls -l .whl
du -sh .whl
