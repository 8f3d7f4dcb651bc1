"""actuator: applies decisions to members (scale, submit, terminate, complete) and reports what it did."""
