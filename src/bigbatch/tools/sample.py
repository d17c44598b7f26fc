"""`bigbatch sample`: text from a finished run's model."""

from __future__ import annotations

from pathlib import Path


def sample_text(run_dir: Path, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int, seed: int) -> str:
    """`prompt` continued by `max_new_tokens` sampled tokens (seeded), decoded."""
    import torch

    from bigbatch.model.artifacts import load_model

    model, tokenizer = load_model(run_dir)
    ids = tokenizer.encode(prompt).ids or [tokenizer.token_to_id("<|endoftext|>")]
    generator = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature, top_k, generator)
    return tokenizer.decode(out[0].tolist())
