#!/usr/bin/env bash
# The wheels benchmarks/gpu_sweep_check.sh carries to the GPU machine, in .whl/ (ignored by git):
# the packages `ikd-sweep run` needs that the machine's image lacks (Ray, MLflow's tracking
# client with its SQLite store, pydantic, datasets and their small dependencies), at the
# versions of this checkout's environment, for CPython 3.12 on x86-64 Linux. What travels to
# that machine must fit 64 MiB with the working tree, so Ray's wheel (79 MB) is rebuilt without
# its Java worker jar (ray/jars, 32 MB), the dashboard's web UI (a local Ray runs no dashboard),
# RLlib, Serve and Ray LLM (never imported by Tune), with those files dropped from its RECORD.
#
#   benchmarks/make_gpu_wheels.sh                 # -> .whl/ (needs pip and PyPI)
#   PYVER=3.11 DEST=/tmp/whl311 benchmarks/make_gpu_wheels.sh   # the same set for this Python
#
# PYTHON (default .venv/bin/python) is the environment whose versions are pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
# Not in the GPU image (/work/.library/device/KINDS.md lists what is): what Ray Tune, MLflow's
# client with its SQLAlchemy store (its import chain reaches databricks-sdk, fastapi and
# cryptography; not google-auth, gitpython, uvicorn or python-dotenv, checked by blocking them)
# and the package import. protobuf and typing-extensions travel too, so that the generated
# OpenTelemetry code and pydantic find the versions they were built against.
PKGS=(ray jsonschema jsonschema-specifications referencing rpds-py tensorboardX
      pydantic pydantic-core annotated-types typing-inspection typing-extensions protobuf
      mlflow-skinny cachetools databricks-sdk fastapi starlette importlib-metadata sqlparse
      opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
      alembic mako cryptography cffi pycparser
      datasets dill multiprocess fsspec)
# Pure-Python wheels where the compiled one only adds speed-ups (SQLAlchemy's: 2 MB vs 4.7 MB).
PURE=(sqlalchemy)
pins() {
  $PY -c 'import sys; from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' "$@"
}
rm -rf "$DEST" && mkdir -p "$DEST"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_5_x86_64; do
  plat+=(--platform "$p")
done
# shellcheck disable=SC2046
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${plat[@]}" -d "$DEST" $(pins "${PKGS[@]}")
# shellcheck disable=SC2046
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation py --abi none --platform any -d "$DEST" $(pins "${PURE[@]}")

# Ray without what a local Tune sweep never loads; RECORD lists only what stays.
$PY - "$DEST"/ray-*.whl <<'EOF'
import os
import sys
import zipfile

DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/llm/")
src = sys.argv[1]
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith(DROP):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not line.decode().startswith(DROP))
        zout.writestr(info, data)
os.replace(tmp, src)
EOF
du -ch "$DEST"/*.whl | tail -n 1
