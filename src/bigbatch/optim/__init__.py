"""Optimizers: a registry of optimizers and combinations over parameter groups (registry.py),
LAMB and LARS (large_batch.py), the learning-rate schedule (schedule.py). Importable without
torch: the config room checks `optim.name` against the registry."""
