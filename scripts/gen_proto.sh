#!/usr/bin/env bash
# Regenerates the gRPC stubs in src/fedcxr/federation/proto/ from fedcxr.proto (needs
# grpcio-tools, in the dev extra). Generated files are committed and never edited by hand.
# Usage: scripts/gen_proto.sh [OUT_ROOT]   (default: src; the stubs land in
# OUT_ROOT/fedcxr/federation/proto)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-src}
mkdir -p "$out/fedcxr/federation/proto"
python -m grpc_tools.protoc -I src --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  src/fedcxr/federation/proto/fedcxr.proto
