"""bigbatch: train Transformers with large, exact, well-chosen batches on any hardware."""

__version__ = "0.1.0"
