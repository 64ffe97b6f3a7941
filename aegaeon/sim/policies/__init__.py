"""The policies the simulator compares: aegaeon and three baselines (each module says what it models)."""
