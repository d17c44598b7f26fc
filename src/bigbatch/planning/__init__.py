"""Memory planning: a pure memory model (memory.py), a measuring probe (probe.py), and the
micro-batch search (search.py) behind `batch.micro_batch_size = "auto"` and `bigbatch plan`."""
