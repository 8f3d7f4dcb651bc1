"""The ``ensemble`` command line: runs the services, the sidecar, and the local tools (up, validate)."""
