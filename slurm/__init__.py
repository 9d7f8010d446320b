"""The benchmark grid on SLURM (submitit job arrays) or on this machine (submitit's LocalExecutor):
``slurm.grid`` (the YAML format), ``slurm.submit`` / ``slurm.status`` (the grid's cells),
``slurm.jobs`` (flow extraction, proposals, pretraining), ``slurm.runner`` (what a job runs,
requeued on preemption), ``slurm.localcluster`` (a real one-node SLURM for tests)."""
