"""`bigbatch export RUN_DIR --format hf --out DIR`: a finished run as a directory that
`transformers` `from_pretrained` loads.

A Hugging Face model's run (model.source = hf:/hf-config:) already holds the model in its own
format; it is loaded with its own class and saved again, which also checks it loads. The built-in
GPT becomes a GPT-2 (`GPT2LMHeadModel`): the architectures are the same (pre-LayerNorm blocks, tanh
GELU = GPT-2's "gelu_new", learned positions, tied embeddings, LayerNorm eps 1e-5, attention
scaled by 1/sqrt(head_dim)), so only the parameter names change and GPT-2's Conv1D layers take
the transposed Linear weights. The tokenizer goes along as a `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bigbatch.errors import UsageError
from bigbatch.model.artifacts import load_model
from bigbatch.model.gpt import GPT

FORMATS = ("hf",)


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The GPT's weights under GPT-2's names (Conv1D weights are (in, out): transposed)."""
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}
    for i, block in enumerate(model.blocks):
        prefix = f"transformer.h.{i}."
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            state[prefix + theirs + ".weight"] = getattr(block, ours).weight
            state[prefix + theirs + ".bias"] = getattr(block, ours).bias
        for ours, theirs in ((block.attn.qkv, "attn.c_attn"), (block.attn.proj, "attn.c_proj"),
                             (block.mlp.fc, "mlp.c_fc"), (block.mlp.proj, "mlp.c_proj")):
            state[prefix + theirs + ".weight"] = ours.weight.t()
            state[prefix + theirs + ".bias"] = ours.bias
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def gpt_to_gpt2(model: GPT, eot_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = model.shape
    config = GPT2Config(vocab_size=shape.vocab_size, n_positions=shape.seq_len,
                        n_embd=shape.d_model, n_layer=shape.n_layer, n_head=shape.n_head,
                        n_inner=4 * shape.d_model, activation_function="gelu_new",
                        resid_pdrop=shape.dropout, embd_pdrop=shape.dropout,
                        attn_pdrop=shape.dropout, layer_norm_epsilon=1e-5,
                        tie_word_embeddings=True, bos_token_id=eot_id, eos_token_id=eot_id)
    gpt2 = GPT2LMHeadModel(config)
    state = gpt2_state_dict(model)
    missing, unexpected = gpt2.load_state_dict(state, strict=False)
    # lm_head.weight is tied to wte; GPT-2's attention bias buffers are not weights.
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")]
    if missing or unexpected:
        raise RuntimeError(f"GPT -> GPT-2 mapping is incomplete: missing {missing}, "
                           f"unexpected {unexpected}")
    gpt2.tie_weights()
    return gpt2.eval()


def export_gpt(run_dir: Path, out: Path) -> str:
    from transformers import PreTrainedTokenizerFast

    from bigbatch.data.tokenizer import EOT, eot_id

    model, tokenizer = load_model(run_dir)
    gpt2 = gpt_to_gpt2(model, eot_id(tokenizer))
    gpt2.save_pretrained(str(out))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT,
                            unk_token=EOT).save_pretrained(str(out))
    return f"GPT2LMHeadModel ({model.num_parameters() / 1e6:.2f}M parameters)"


def export_hf(run_dir: Path, out: Path, trust_remote_code: bool = False) -> str:
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from bigbatch.model.hf import quiet_transformers

    config = AutoConfig.from_pretrained(str(run_dir), local_files_only=True,
                                        trust_remote_code=trust_remote_code)
    name = (config.architectures or [""])[0]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise UsageError(f"{str(run_dir)!r} holds a {name or 'model of no named class'}, which "
                         "transformers does not define (remote code): copy the directory instead")
    with quiet_transformers():
        model = cls.from_pretrained(str(run_dir), local_files_only=True)
        model.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(run_dir), local_files_only=True).save_pretrained(
            str(out))
    if (run_dir / "labels.json").is_file():
        (out / "labels.json").write_text((run_dir / "labels.json").read_text())
    return f"{name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)"


def export(run_dir: Path, out: Path, fmt: str = "hf") -> str:
    """Write the run's model to `out` in format `fmt`; returns what was written."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not supported: one of {', '.join(FORMATS)}")
    if not run_dir.is_dir():
        raise UsageError(f"{str(run_dir)!r} is not a run directory")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {str(out)!r} exists and is not empty: give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    if (run_dir / "config.json").is_file():
        trust = False
        if (run_dir / "config.toml").is_file():
            from bigbatch.config.files import load_config

            trust = load_config(run_dir / "config.toml").model.trust_remote_code
        return export_hf(run_dir, out, trust)
    if (run_dir / "model.json").is_file():
        return export_gpt(run_dir, out)
    raise UsageError(f"{str(run_dir)!r} is not a finished run directory: it has neither a "
                     "Hugging Face model (config.json) nor a GPT (model.json)")

