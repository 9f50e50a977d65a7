"""Training: the training loop and learning-rate schedules."""
