"""What pretraining, the four harnesses and the cluster code share, and nothing task-specific:
safe paths, atomic file writes, one-line errors."""
