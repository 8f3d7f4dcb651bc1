"""The gRPC sidecar in front of a job queue: ``ensemble sidecar --backend local ...``."""
