#!/usr/bin/env bash
# Builds a folder of wheels for GPU nodes that cannot reach a package index.
#
#   launch/wheelhouse.sh [OUT_DIR] [PYTHON_VERSION]        (defaults: .whl 3.12)
#
# Run it on a machine with network access and torch installed (DeepSpeed's build imports torch).
# DeepSpeed publishes only a source archive, so it is built here with no compiled ops
# (DS_BUILD_OPS=0: the trainer steps torch's AdamW and uses none of them; other ops would JIT-compile on
# the GPU node, which needs ninja and nvcc).
# The pure-python and binary dependencies are downloaded for the node's Python, not this one's.
# On the node, with the interpreter that has torch (pip writes its own interpreter into the
# `deepspeed` launcher's first line; another one's fails with "No module named 'torch'"):
#   python -m pip install --no-index --no-deps --target /tmp/site OUT_DIR/*.whl
#   export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
#   export TORCH_CUDA_ARCH_LIST=9.0   # on Hopper images that advertise "9.0a", which DeepSpeed cannot parse
set -euo pipefail
out=${1:-.whl}
py=${2:-3.12}
ds_version=${DS_VERSION:-$(python -c "import importlib.metadata as m; print(m.version('deepspeed'))" 2>/dev/null || echo 0.19.8)}
# What a CUDA PyTorch image usually lacks of DeepSpeed's requirements (einops, msgpack, ninja,
# numpy, packaging, psutil, py-cpuinfo and tqdm are nearly always there already).
pure=(hjson pydantic annotated-types typing-inspection)
binary=(pydantic-core)

mkdir -p "$out"
if ! ls "$out"/deepspeed-"$ds_version"-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w "$out" "deepspeed==$ds_version"
fi
# pydantic pins its pydantic-core exactly: resolve the pair on this machine, then fetch for the node
pydantic_version=$(python -c "import pydantic; print(pydantic.VERSION)")
core_version=$(python -c "import pydantic_core; print(pydantic_core.__version__)")
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
dl() { python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        "${platforms[@]}" -d "$out" "$@"; }
for name in "${pure[@]}"; do
    case $name in
        pydantic) dl "pydantic==$pydantic_version" ;;
        *) dl "$name" ;;
    esac
done
for name in "${binary[@]}"; do
    dl "$name==$core_version"
done
ls -1 "$out"
