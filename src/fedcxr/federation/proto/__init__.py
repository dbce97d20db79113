"""Generated gRPC stubs of the federation protocol (fedcxr.proto; scripts/gen_proto.sh)."""
