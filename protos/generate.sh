#!/usr/bin/env bash
# Regenerates the Python stubs of protos/*.proto into ensemble_core/rpc/ (committed; CI checks they are fresh).
# Usage: protos/generate.sh [OUTDIR]   (OUTDIR defaults to the repository root)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(dirname "$here")}
python -m grpc_tools.protoc \
  --proto_path=ensemble_core/rpc="$here" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  ensemble_core/rpc/ensemble_service.proto
