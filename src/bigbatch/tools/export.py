"""`bigbatch export RUN_DIR --format hf --out DIR`: a finished run as a directory that
`transformers` `from_pretrained` loads.

A Hugging Face model's run (model.source = hf:/hf-config:) already holds the model in its own
format; it is loaded with its own class and saved again, which also checks it loads. The built-in
GPT becomes a GPT-2 (`GPT2LMHeadModel`): the architectures are the same (pre-LayerNorm blocks, tanh
GELU = GPT-2's "gelu_new", learned positions, tied embeddings, LayerNorm eps 1e-5, attention
scaled by 1/sqrt(head_dim)), so only the parameter names change and GPT-2's Conv1D layers take
the transposed Linear weights. The tokenizer goes along as a `PreTrainedTokenizerFast`.

A LoRA run (model.adapter = "lora") of a Hugging Face model holds the peft adapter directory
(adapter_config.json, adapter_model.safetensors: the adapters and a classifier's head) and no
copy of the frozen base, which its config's model.source names: the export rebuilds the base,
loads the adapters through peft and writes the adapter directory again (`PeftModel.from_pretrained
(base, DIR)` loads it), or with `--merge` the plain model with the adapters merged in. A LoRA run
of the built-in GPT saves its weights merged already, so its export is the GPT-2 one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bigbatch.errors import UsageError
from bigbatch.model.adapters import ADAPTER_CONFIG, quiet_peft
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


def export_adapter(run_dir: Path, out: Path, merge: bool) -> str:
    """A Hugging Face model's LoRA run: the base rebuilt from the run's model.source (the run
    holds only the adapters and the head), the adapters loaded by peft from the run directory,
    then saved as peft's adapter directory, or merged into the base and saved as a plain model."""
    from peft import PeftModel

    from bigbatch.config.files import load_config
    from bigbatch.model.hf import build_hf_model, load_tokenizer, parse_source, quiet_transformers
    from bigbatch.tasks import task_of

    cfg = load_config(run_dir / "config.toml")
    source = parse_source(cfg.model.source)
    labels = None
    if (run_dir / "labels.json").is_file():  # a classifier's head: one output per label
        labels = [name for _, name in sorted(
            (int(k), v) for k, v in json.loads((run_dir / "labels.json").read_text()).items())]
    base = build_hf_model(source, task_of(cfg).model_head,
                          trust_remote_code=cfg.model.trust_remote_code, labels=labels)
    with quiet_transformers(), quiet_peft():
        adapted = PeftModel.from_pretrained(base, str(run_dir))
        tokenizer = load_tokenizer(source, "", cfg.model.trust_remote_code)
        if (run_dir / "tokenizer.json").is_file():  # the run's own copy, as it trained with
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(run_dir), local_files_only=True)
        if merge:
            plain = adapted.merge_and_unload()
            plain.save_pretrained(str(out))
            what = f"{type(plain).__name__} with LoRA merged"
        else:
            adapted.save_pretrained(str(out))
            what = f"LoRA adapter for {type(base).__name__}"
        tokenizer.save_pretrained(str(out))
    if (run_dir / "labels.json").is_file():
        (out / "labels.json").write_text((run_dir / "labels.json").read_text())
    return what


def export(run_dir: Path, out: Path, fmt: str = "hf", merge: bool = False) -> str:
    """Write the run's model to `out` in format `fmt`; returns what was written. A LoRA run of a
    Hugging Face model gives its peft adapter directory, or with `merge` a plain model."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not supported: one of {', '.join(FORMATS)}")
    if not run_dir.is_dir():
        raise UsageError(f"{str(run_dir)!r} is not a run directory")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {str(out)!r} exists and is not empty: give a new directory")
    if merge and not (run_dir / ADAPTER_CONFIG).is_file():
        raise UsageError(f"--merge is for a LoRA run (model.adapter = \"lora\"); "
                         f"{str(run_dir)!r} has no adapters to merge")
    out.mkdir(parents=True, exist_ok=True)
    if (run_dir / ADAPTER_CONFIG).is_file() and not (run_dir / "model.json").is_file():
        return export_adapter(run_dir, out, merge)
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

