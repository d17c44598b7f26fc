"""`optim.name = "muon"` (optim/registry.py's entry, optim/muon.py): Muon on the matrices of the
repeated Transformer layers, AdamW on everything else.

Invariants:
- the split: every 2-D weight inside a repeated layer (found as FSDP finds them) is under Muon
  and nothing else is, for the built-in GPT and Hugging Face GPT-2 and BERT alike; embeddings,
  the (tied) head, norms, biases, a pooler and a classifier stay under AdamW;
- two Muon steps equal a hand-written reference (EMA momentum, Nesterov, the quintic
  Newton-Schulz iteration with torch's coefficients, lr x 0.2 sqrt(max(A, B)), decoupled decay)
  to 1e-5; in bf16 the fp32-capable update is torch's own step bit for bit;
- accumulation over 4 micro-steps gives the gradients of one big batch, and then the same step;
- under FSDP the matrices go to Newton-Schulz in rounds of one a rank, each matrix once, a
  round's matrices of equal cost where the shapes allow (the default GPT's do);
- the planner counts 1 state tensor per Muon parameter and 2 per AdamW one: exactly the state
  the built optimizer holds after a step;
- a power-of-2 fp16 loss scale changes nothing; a checkpoint reloads and the run continues bit
  for bit; stop-and-resume of a whole run is exact (slow); 2 ranks under DDP and FSDP equal 1
  process (tests/integration/test_muon_ranks.py);
- bad values and a model without repeated layers are one-line errors; with LoRA every adapter
  trains under AdamW (Muon takes nothing); muon
  under FSDP is accepted.
"""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch

from bigbatch.batch import MicroBatch
from bigbatch.config.files import load_config
from bigbatch.config.sections import OptimConfig, PrecisionConfig
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import train_step
from bigbatch.errors import UsageError
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.optim.muon import Muon, muon_update, newton_schulz_dtype, newton_schulz_rounds
from bigbatch.optim.registry import build_optimizer, trainable_parameters
from bigbatch.planning.memory import ModelDims
from bigbatch.planning.planner import count_optimizer_state
from bigbatch.run.checkpoint_state import load_optimizer_state, optimizer_state
from bigbatch.tools.verify import (
    accumulated_gradients,
    concatenate,
    max_relative_error,
    reference_gradients,
)
from small_runs import RECIPE

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
SHAPE = GPTShape(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=16)
FP32 = make_precision(PrecisionConfig(dtype="fp32"), CPU)
MUON = OptimConfig(name="muon", lr=0.02, warmup_steps=0)


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(SHAPE)


def batch(step: int, rows: int = 2) -> list[MicroBatch]:
    generator = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, SHAPE.vocab_size, (2, rows, SHAPE.seq_len), generator=generator)
    return [MicroBatch(tokens[0], tokens[1])]


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def hf_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2))


# Each model's hidden-layer matrices, by name, written out independently of layers.py.
HIDDEN = {"gpt": (gpt, r"blocks\.\d+\."), "gpt2": (hf_gpt2, r"transformer\.h\.\d+\."),
          "bert": (hf_bert, r"bert\.encoder\.layer\.\d+\.")}


@pytest.mark.parametrize("kind", HIDDEN)
def test_muon_takes_every_hidden_layer_matrix_and_nothing_else(kind):
    make, prefix = HIDDEN[kind]
    net = make()
    optimizer = build_optimizer(net, MUON, CPU)
    muon, adamw = optimizer.optimizers
    assert type(muon) is Muon and type(adamw) is torch.optim.AdamW
    names = {id(p): n for n, p in net.named_parameters()}
    under_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    under_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    expected = {n for n, p in net.named_parameters() if re.match(prefix, n) and p.dim() == 2}
    assert under_muon == expected and len(expected) >= 8
    assert under_adamw == set(names.values()) - expected
    assert any("wte" in n or "word_embeddings" in n for n in under_adamw)  # embeddings
    assert {p.dim() for g in muon.param_groups for p in g["params"]} == {2}


def reference_muon(weight: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float,
                   mu: float = 0.95) -> torch.Tensor:
    """Muon by hand, in float64: momentum as an EMA (torch's lerp), Nesterov, five quintic
    Newton-Schulz steps on the wide orientation, lr x 0.2 sqrt(max(A, B)), decoupled decay."""
    a, b, c = 3.4445, -4.775, 2.0315
    w, buf = weight.double().clone(), torch.zeros_like(weight, dtype=torch.float64)
    for g in grads:
        g = g.double()
        buf = mu * buf + (1 - mu) * g
        x = (1 - mu) * g + mu * buf
        tall = x.shape[0] > x.shape[1]
        x = x.T if tall else x
        x = x / max(x.norm().item(), 1e-7)
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if tall else x
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(w.shape)) * x
    return w


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_two_muon_steps_equal_the_hand_written_reference(shape):
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(shape) * 0.1)
    grads = [torch.randn(shape), torch.randn(shape) * 0.5]
    expected = reference_muon(weight.detach(), grads, lr=0.02, wd=0.1)
    optimizer = Muon([weight], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw",
                     ns_dtype=torch.float32)
    for g in grads:
        weight.grad = g.clone()
        optimizer.step()
    assert (weight.detach().double() - expected).abs().max() < 1e-5
    assert set(optimizer.state[weight]) == {"momentum_buffer"}


def test_in_bf16_the_update_is_torchs_own_step_bit_for_bit():
    torch.manual_seed(2)
    ours, torchs = (torch.nn.Parameter(torch.randn(24, 16)) for _ in range(2))
    torchs.data.copy_(ours.data)
    grad = torch.randn(24, 16)
    reference = torch.optim.Muon([torchs], lr=0.02, adjust_lr_fn="match_rms_adamw")
    torchs.grad = grad.clone()
    reference.step()
    group = dict(reference.param_groups[0])
    muon_update([ours], [grad.clone()], [torch.zeros_like(ours)], group, torch.bfloat16)
    assert torch.equal(ours, torchs)


def test_the_newton_schulz_dtype_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    flags = set(open("/proc/cpuinfo").read().split())
    native = bool(flags & {"avx512_bf16", "amx_tile", "amx_bf16"})
    assert newton_schulz_dtype(CPU) == (torch.bfloat16 if native else torch.float32)
    assert newton_schulz_dtype(torch.device("cuda")) == torch.bfloat16
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert newton_schulz_dtype(CPU) == torch.float32


def test_newton_schulz_rounds_hold_one_matrix_a_rank_of_equal_cost():
    layer = [(1152, 384), (384, 384), (1536, 384), (384, 1536)]  # the default GPT's matrices
    shapes = layer * 4
    rounds = newton_schulz_rounds(shapes, 2)
    assert sorted(i for r in rounds for i in r) == list(range(16))  # each matrix once
    assert all(len(r) == 2 for r in rounds)
    # Cost ~ min^2 (2 max + min): fc and its projection cost the same, so they pair up.
    assert all({max(shapes[i]) for i in r} in ({1536}, {1152}, {384}) for r in rounds)
    assert newton_schulz_rounds(shapes, 1) == [[i] for i in newton_schulz_rounds(shapes, 16)[0]]
    assert newton_schulz_rounds([(5, 3)], 2) == [[0]]  # fewer matrices than ranks


def test_accumulation_with_muon_equals_one_big_batch():
    """4 micro-batches of 2 rows give the gradients of one batch of 8 (verify's check), and one
    Muon step from them moves the weights as the one-batch step does."""
    micro = [batch(i)[0] for i in range(4)]
    net = gpt()
    assert max_relative_error(accumulated_gradients(net, micro),
                              reference_gradients(net, micro)) < 1e-5
    accumulated, whole = gpt(), gpt()
    before = {n: p.detach().clone() for n, p in whole.named_parameters()}
    for model, batches in ((accumulated, micro), (whole, [concatenate(micro)])):
        train_step(model, build_optimizer(model, MUON, CPU), batches, precision=FP32)
    moved = [p.detach() - before[n] for n, p in accumulated.named_parameters()]
    expected = [p.detach() - before[n] for n, p in whole.named_parameters()]
    assert max_relative_error(moved, expected) < 1e-4
    assert all(e.abs().max() > 0 for e in expected)


def test_the_planner_counts_one_tensor_per_muon_parameter_and_two_per_adamw(tiny_overrides):
    cfg = load_config(RECIPE, [*tiny_overrides, "--optim.name=muon", "--model.n_layer=2"])
    dims = ModelDims(cfg.data.vocab_size, cfg.data.seq_len, cfg.model.n_layer,
                     cfg.model.d_model, cfg.model.n_head)
    net = GPT(GPTShape(dims.vocab_size, dims.seq_len, dims.n_layer, dims.n_head, dims.d_model))
    optimizer = build_optimizer(net, cfg.optim, CPU)
    train_step(net, optimizer, [MicroBatch(*torch.randint(0, dims.vocab_size,
                                                          (2, 1, dims.seq_len)))], precision=FP32)
    held = sum(t.numel() for state in optimizer.state.values() for key, t in state.items()
               if key != "step")  # Adam's step counters are scalars, not per-element state
    muon = sum(p.numel() for p in optimizer.optimizers[0].param_groups[0]["params"])
    total = sum(p.numel() for _, p in trainable_parameters(net))
    assert count_optimizer_state(cfg, dims) == held == muon + 2 * (total - muon)
    assert len(optimizer.optimizers[0].state) == 8  # reading AdamW's state planted nothing
    optimizer.state_dict()


def test_a_power_of_two_loss_scale_changes_nothing():
    plain_net, scaled_net = gpt(), gpt()
    plain = build_optimizer(plain_net, MUON, CPU)
    scaled = build_optimizer(scaled_net, MUON, CPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    micro = batch(0)[0]
    for net, optimizer in ((plain_net, plain), (scaled_net, scaled)):
        loss = torch.nn.functional.cross_entropy(net(micro.inputs).flatten(0, 1),
                                                 micro.targets.flatten())
        if optimizer is plain:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
    for a, b in zip(plain_net.parameters(), scaled_net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_reloads_and_the_run_continues_bit_for_bit():
    net = gpt()
    optimizer = build_optimizer(net, MUON, CPU)
    for number in range(2):
        train_step(net, optimizer, batch(number), precision=FP32, clip_norm=1.0)
    buffer = io.BytesIO()  # as on disk: optimizer.pt is torch.save of this state
    torch.save(optimizer_state(net, optimizer), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["state"]["blocks.0.attn.qkv.weight"]) == {"momentum_buffer"}
    clone = copy.deepcopy(net)
    restored = build_optimizer(clone, MUON, CPU)
    load_optimizer_state(clone, restored, saved)
    for number in range(2, 4):
        for n, o in ((net, optimizer), (clone, restored)):
            train_step(n, o, batch(number), precision=FP32, clip_norm=1.0)
    for a, b in zip(net.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("override, message", [
    ("--optim.muon_momentum=1.0", "optim.muon_momentum = 1.0 is invalid: a number in [0, 1)"),
    ("--optim.muon_ns_steps=0", "optim.muon_ns_steps = 0 is invalid: an integer from 1 to 99"),
    ("--optim.muon_adjust_lr=keller", "optim.muon_adjust_lr = 'keller' is invalid: one of"),
])
def test_bad_muon_settings_are_one_line_errors(override, message):
    with pytest.raises(UsageError) as raised:
        load_config(RECIPE, ["--optim.name=muon", override])
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_with_lora_every_adapter_trains_under_adamw_and_muon_takes_nothing():
    """LoRA freezes the whole matrices Muon is for; its low-rank factors go to AdamW."""
    pytest.importorskip("peft")
    from bigbatch.config.sections import ModelConfig
    from bigbatch.model.adapters import apply_adapter

    torch.manual_seed(0)
    model = apply_adapter(GPT(GPTShape(vocab_size=64, seq_len=16, n_layer=2, n_head=2,
                                       d_model=16)),
                          ModelConfig(adapter="lora", lora_rank=4), "causal-lm")
    optimizer = build_optimizer(model, MUON, CPU)
    parts = getattr(optimizer, "optimizers", [optimizer])
    assert not any(isinstance(part, Muon) for part in parts)
    stepped = {id(p) for part in parts for group in part.param_groups for p in group["params"]}
    adapters = {id(p) for name, p in trainable_parameters(model) if ".lora_" in name}
    assert adapters and adapters <= stepped
    assert stepped == {id(p) for _, p in trainable_parameters(model)}


def test_a_model_without_repeated_layers_is_a_one_line_error():
    no_layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    with pytest.raises(UsageError, match="needs repeated Transformer layers .* adamw$"):
        build_optimizer(no_layers, MUON, CPU)


def test_a_one_layer_gpt_has_its_layer_s_matrices_under_muon():
    one_layer = GPT(GPTShape(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16))
    optimizer = build_optimizer(one_layer, MUON, CPU)
    [muon] = [part for part in optimizer.optimizers if isinstance(part, Muon)]
    took = {id(p) for group in muon.param_groups for p in group["params"]}
    assert took == {id(p) for p in one_layer.blocks[0].parameters() if p.dim() == 2}


def test_muon_under_fsdp_is_accepted():
    cfg = load_config(RECIPE, ["--optim.name=muon", "--parallel.strategy=fsdp"])
    assert (cfg.optim.name, cfg.parallel.strategy) == ("muon", "fsdp")


@pytest.mark.slow  # three training runs
def test_stop_and_resume_with_muon_and_wsd_matches_an_uninterrupted_run(tmp_path,
                                                                         tiny_overrides):
    """As test_resume.py: 3 steps, a stop, a resume into fresh objects give the rows and final
    weights of 6 steps straight, bit for bit, with muon (2 layers) and a wsd cooldown that
    starts before the stop."""
    from bigbatch.run.train import train
    from small_runs import StopAfter, metric_rows, small_config

    extra = ("--optim.name=muon", "--model.n_layer=2", "--optim.decay=wsd",
             "--optim.cooldown_fraction=0.6")
    straight = train(small_config(tiny_overrides, *extra), tmp_path / "straight", verbose=False)
    cfg = small_config(tiny_overrides, *extra, "--checkpoint.every_steps=2")
    run_dir = tmp_path / "resumed"
    first = train(cfg, run_dir, verbose=False, preemption=StopAfter(3))
    assert first.state.step == 3
    second = train(cfg, run_dir, verbose=False, resume="auto")
    assert second.state.step == 6
    rows = metric_rows(straight.out_dir)
    assert metric_rows(run_dir) == rows
    lrs = [row["lr"] for row in rows if "lr" in row]
    assert lrs[1] == max(lrs) > lrs[2] > lrs[-1]  # the cooldown began before the stop
    assert ((run_dir / "model.safetensors").read_bytes()
            == (straight.out_dir / "model.safetensors").read_bytes())
