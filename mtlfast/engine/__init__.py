"""Training and evaluation: config, trainer, checkpoints, distributed plumbing, logs."""
