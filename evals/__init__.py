"""Transfer evaluations (protocols.md P2-P5): one harness per task, plus pure metrics in ``evals.metrics``."""
