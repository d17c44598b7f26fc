"""Training engine: schedule (pure), optimizer, train_step (gradient arithmetic), fit (the loop)."""
