"""The ``ensemble`` command line: runs the services, the sidecar, and the local tools (up, validate)."""

import os

# gRPC's fork handlers are for processes that fork and go on using gRPC; ours only fork to exec (job and
# service subprocesses), where those handlers can deadlock the child before it execs (grpc/grpc#22624).
# gRPC documents GRPC_ENABLE_FORK_SUPPORT=false for exactly this case; it must be set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
