"""Training: the recipe, log-probs, evaluation, metrics, checkpoints, progress and plots."""
