"""Training loops that run inside Ray Train workers (one per stage kind)."""
