"""`bigbatch sample`: text from a finished run's model: the built-in GPT (model.json), or a
Hugging Face causal LM saved in its own format (a Hugging Face or `train.task = "sft"` run:
config.json), sampled by its own `generate()`."""

from __future__ import annotations

from pathlib import Path


def sample_text(run_dir: Path, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int, seed: int) -> str:
    """`prompt` continued by `max_new_tokens` sampled tokens (seeded), decoded."""
    import torch

    from bigbatch.model.artifacts import load_model

    if (run_dir / "config.json").is_file() and not (run_dir / "model.json").is_file():
        return sample_hf(run_dir, prompt, max_new_tokens, temperature, top_k, seed)
    model, tokenizer = load_model(run_dir)
    ids = tokenizer.encode(prompt).ids or [tokenizer.token_to_id("<|endoftext|>")]
    generator = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature, top_k, generator)
    return tokenizer.decode(out[0].tolist())


def sample_hf(run_dir: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
              seed: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigbatch.model.hf import quiet_transformers

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(run_dir), local_files_only=True).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    torch.manual_seed(seed)
    sampled = temperature > 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=sampled,
                             temperature=temperature if sampled else None,
                             top_k=top_k if sampled and top_k else None,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0].tolist())
