"""Checked before work: LoRA targets that peft cannot adapt, and a Hugging Face directory whose
weights are missing or cut short, are one line naming the bad value and what would be valid,
before peft or transformers touch the model (and, for the weights, before the corpus is read)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config.model_section import ModelConfig
from bigbatch.errors import UsageError
from bigbatch.model.adapters import adaptable_names, apply_adapter
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.model.hf import WEIGHTS_FILES, parse_source
from small_runs import small_args

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_gpt() -> GPT:
    return GPT(GPTShape(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=16, dropout=0.0))


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def lora(*targets: str) -> ModelConfig:
    return ModelConfig(adapter="lora", lora_targets=targets)


def one_line_error(call) -> str:
    with pytest.raises(UsageError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(("target", "kind"), [("ln_1", "LayerNorm"), ("blocks", "ModuleList"),
                                              ("attn", "CausalSelfAttention")])
def test_a_lora_target_peft_cannot_adapt_is_one_line_listing_the_valid_names(target, kind):
    """A LayerNorm or a container (which get_peft_model refuses with a traceback) names the
    target, what it is, and the adaptable module names once each (the GPT's qkv, proj, fc)."""
    message = one_line_error(lambda: apply_adapter(tiny_gpt(), lora("qkv", target), "causal-lm"))
    assert f"model.lora_targets = ['qkv', {target!r}] is invalid: {target!r} is a {kind}" in message
    assert message.endswith("adaptable modules: wte, wpe, qkv, proj, fc, lm_head"), message


def test_a_hugging_face_models_bad_target_lists_its_own_names():
    message = one_line_error(lambda: apply_adapter(tiny_gpt2(), lora("ln_1"), "causal-lm"))
    assert "'ln_1' is a LayerNorm" in message and "c_attn, c_proj, c_fc" in message
    assert "no module named 'nope'" in one_line_error(
        lambda: apply_adapter(tiny_gpt2(), lora("nope"), "causal-lm"))


@pytest.mark.parametrize("make", [tiny_gpt, tiny_gpt2], ids=["gpt", "gpt2"])
def test_every_name_listed_as_valid_is_adapted_by_peft(make):
    """The list the error gives is true: peft adapts each name (and a full-path suffix too)."""
    names = adaptable_names(make())
    assert names
    for name in names:
        adapted = apply_adapter(make(), lora(name), "causal-lm")
        assert any(p.requires_grad for p in adapted.parameters()), name
    apply_adapter(tiny_gpt(), lora("attn.qkv"), "causal-lm")  # peft matches name suffixes


# --- Hugging Face directories: weights that load --------------------------------------------------

@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 saved with save_pretrained (config.json + model.safetensors), offline."""
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(root)
    return root


def copy_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*names))
    return dst


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_a_complete_directory_passes(saved_gpt2):
    assert parse_source(f"hf:{saved_gpt2}").path == saved_gpt2


def test_a_directory_without_weights_is_one_line_naming_the_expected_files(saved_gpt2, tmp_path):
    bare = copy_without(saved_gpt2, tmp_path / "bare", "*.safetensors")
    message = one_line_error(lambda: parse_source(f"hf:{bare}"))
    assert "has no weights: expected one of " + ", ".join(WEIGHTS_FILES) in message


def test_truncated_safetensors_is_one_line_naming_the_file(saved_gpt2, tmp_path):
    cut = copy_without(saved_gpt2, tmp_path / "cut")
    cut_in_half(cut / "model.safetensors")
    message = one_line_error(lambda: parse_source(f"hf:{cut}"))
    assert f"the weights file {str(cut / 'model.safetensors')!r} is truncated" in message


def test_truncated_pytorch_bin_is_one_line_naming_the_file(saved_gpt2, tmp_path):
    bins = copy_without(saved_gpt2, tmp_path / "bin", "*.safetensors")
    torch.save(tiny_gpt2().state_dict(), bins / "pytorch_model.bin")
    assert parse_source(f"hf:{bins}").path == bins  # whole: accepted
    cut_in_half(bins / "pytorch_model.bin")
    message = one_line_error(lambda: parse_source(f"hf:{bins}"))
    assert f"{str(bins / 'pytorch_model.bin')!r} is truncated" in message


def test_a_truncated_model_stops_train_before_the_corpus_is_read(saved_gpt2, tmp_path,
                                                                 tiny_overrides, monkeypatch,
                                                                 capsys):
    cut = copy_without(saved_gpt2, tmp_path / "cut")
    cut_in_half(cut / "model.safetensors")

    def no_corpus(*args, **kwargs):
        raise AssertionError("the corpus was prepared before the weights were checked")

    monkeypatch.setattr("bigbatch.tasks.lm.wiring.load_corpus", no_corpus)
    code = main(["train", *small_args(tiny_overrides, f"--model.source=hf:{cut}",
                                      "--model.adapter=lora"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("bigbatch: error:"), err
    assert "model.safetensors' is truncated" in err
