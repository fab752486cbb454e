"""The run directory: checkpoints, the workdir lock, preemption, file I/O (local and gs://),
metrics and progress. Knows nothing of models or RL."""
