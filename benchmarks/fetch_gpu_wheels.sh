#!/usr/bin/env bash
# Download the wheels the lent GPU machine's image lacks into .whl/ (git-ignored), so that
# benchmarks/gpu_suite.sh can install them there: that machine has no network.
#
# What the image lacks (see the device notes' package list, KINDS.md): only bitsandbytes.
# Everything else vesper-sdk and the suite import is already there (torch 2.11, triton 3.6,
# numpy, tokenizers 0.23, safetensors 0.8, tqdm, matplotlib, onnx, onnxruntime (CPU),
# onnxscript, transformers, packaging). bitsandbytes needs torch, numpy and packaging only.
# gradio (the demo) is not part of the GPU suite, so it is not fetched.
#
# Run from anywhere: ./benchmarks/fetch_gpu_wheels.sh  (needs network to PyPI, here only)
set -euo pipefail
cd "$(dirname "$0")/.."

# The version this repo's .venv uses, so CPU and GPU runs exercise the same library.
BNB_VERSION="${BNB_VERSION:-0.50.2}"
LIMIT_MIB=64   # the working tree plus carried paths that may travel to the device

mkdir -p .whl
if ! git check-ignore -q .whl/probe.whl 2>/dev/null; then
    echo "warning: .whl/ is not git-ignored; add '/.whl/' to .gitignore or .git/info/exclude" >&2
fi
# Keep one version of each package: two versions in .whl/ stop the whole install there.
rm -f .whl/bitsandbytes-*.whl

# The device notes' command, plus manylinux_2_24: bitsandbytes >= 0.43 is tagged
# manylinux_2_24 only, and pip matches the N of manylinux_2_N exactly.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "bitsandbytes==${BNB_VERSION}"

# Its requirements (torch, numpy, packaging) are all in the image; show them for the record.
for w in .whl/*.whl; do
    echo "== $(basename "$w")"
    unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true
done

# What travels: tracked files + untracked files git does not ignore, plus .whl/.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
whl_bytes=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
total=$((tree_bytes + whl_bytes))
printf 'wheels: %.1f MiB, working tree: %.1f MiB, together: %.1f MiB (limit %d MiB)\n' \
    "$(echo "$whl_bytes / 1048576" | bc -l)" "$(echo "$tree_bytes / 1048576" | bc -l)" \
    "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
    echo "error: over the ${LIMIT_MIB} MiB the device accepts" >&2
    exit 1
fi
