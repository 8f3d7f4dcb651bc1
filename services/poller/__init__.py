"""poller: turns each member's sidecar status into a stream of ``Metrics`` messages."""
