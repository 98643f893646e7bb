#!/usr/bin/env bash
# Download, on a machine with internet, the wheels a GPU machine without it needs for
# scripts/gpu_check.sh, into .whl/ (git-ignored):
#
#   scripts/fetch_gpu_wheels.sh            # Python 3.12, manylinux x86_64
#   PY_VERSION=3.11 scripts/fetch_gpu_wheels.sh
#   DRY_RUN=1 scripts/fetch_gpu_wheels.sh  # print the list and the pip commands only
#
# What: deepspeed (built here with `pip wheel`: it ships only a source archive; its ops compile on
# first use), bitsandbytes, datasets, evaluate, wandb, the rest of scalelora's runtime dependencies,
# and everything they require, at the versions installed on THIS machine (the ones the CPU tests
# passed with). Left out: torch and its CUDA stack (triton, nvidia-*) and numpy, which the GPU image
# brings matched to its CUDA. scripts/gpu_check.sh installs only the wheels the image lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_DIR=${WHEEL_DIR:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
read -ra PACKAGES <<< "${PACKAGES:-deepspeed bitsandbytes datasets evaluate wandb transformers peft accelerate safetensors pyyaml tqdm scikit-learn}"
PY_TAG=cp${PY_VERSION/./}

# name==version for the packages and their requirements, resolved from this machine's metadata
mapfile -t pins < <(
  python - "$PY_VERSION" "${PACKAGES[@]}" << 'PY'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

py_version, wanted = sys.argv[1], sys.argv[2:]
skip = re.compile(r"^(torch|triton|numpy|nvidia-.*|cuda-.*|pip|setuptools|wheel)$")
env = {"python_version": py_version, "python_full_version": py_version + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
seen, todo = {}, [norm(w) for w in wanted]
while todo:
    name = todo.pop()
    if name in seen or skip.match(name):
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        sys.exit(f"fetch_gpu_wheels: {name} is not installed here; install it (make install) first")
    seen[name] = dist.version
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            todo.append(norm(req.name))
for name in sorted(seen):
    print(f"{name}=={seen[name]}")
PY
)
binary=()
source_only=()
for pin in "${pins[@]}"; do
  case $pin in
    deepspeed==*) source_only+=("$pin") ;;
    *) binary+=("$pin") ;;
  esac
done
echo "fetch_gpu_wheels: ${#pins[@]} packages for Python ${PY_VERSION} into ${WHEEL_DIR}/"

download=(python -m pip download --no-deps --only-binary=:all: --dest "$WHEEL_DIR"
  --python-version "$PY_VERSION" --implementation cp --abi "$PY_TAG" --abi abi3 --abi none
  --platform manylinux2014_x86_64 --platform any)
# a GPU image with glibc >= 2.35 (Ubuntu 22.04) runs every manylinux_2_X wheel up to 2.35
for glibc in 17 24 27 28 31 34 35; do
  download+=(--platform "manylinux_2_${glibc}_x86_64")
done
build=(python -m pip wheel --no-deps --no-build-isolation --wheel-dir "$WHEEL_DIR")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%s\n' "${pins[@]}"
  echo "${download[*]} ${binary[*]}"
  echo "DS_BUILD_OPS=0 ${build[*]} ${source_only[*]}"
  exit 0
fi
mkdir -p "$WHEEL_DIR"
"${download[@]}" "${binary[@]}"
if ((${#source_only[@]})); then
  DS_BUILD_OPS=0 "${build[@]}" "${source_only[@]}"
fi
echo "fetch_gpu_wheels: $(find "$WHEEL_DIR" -name '*.whl' | wc -l) wheels in ${WHEEL_DIR}/"
