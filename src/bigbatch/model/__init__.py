"""Models: the built-in GPT (knows nothing of DDP, autocast or accumulation), Hugging Face models in, activation checkpointing, final weights on disk."""
