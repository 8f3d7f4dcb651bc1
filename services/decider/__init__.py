"""decider: runs each member's algorithm over its metrics and publishes the decisions."""
