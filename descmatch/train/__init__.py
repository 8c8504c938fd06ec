"""Training: datasets, samplers, losses, loop and evaluation."""
