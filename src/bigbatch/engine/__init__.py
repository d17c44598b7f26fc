"""Training engine: train_step (gradient arithmetic), fit (the loop), precision, losses."""
