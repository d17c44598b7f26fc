"""Worker for tests/integration/test_fsdp_sharding.py, launched on 2 CPU ranks by
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT.pt`.

For each case it builds a model (tiny Hugging Face GPT-2 and Llama from configs, or the built-in
GPT), wraps it with `parallelize(..., "fsdp")`, and runs one `train_step` with SGD(lr=1) on its
contiguous share of the global batch. Rank 0 saves the FSDP units made, the full parameters
before and after, the reduce-scatters per micro-step with their dtypes, and the dtype of the
parameters each layer computed with. The test rebuilds the same problem in one process as the
oracle (`make_problem`).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

from bigbatch.batch import MicroBatch
from bigbatch.config.sections import PrecisionConfig
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import train_step
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.parallel.process_group import dist_info_from_env
from bigbatch.parallel.wrap import fsdp_units, parallelize, transformer_layers

VOCAB, SEQ, MICRO_BATCH, WORLD_SIZE = 96, 16, 2, 2


@dataclass(frozen=True)
class Case:
    model: str              # gpt2 | llama | gpt
    k: int                  # micro-steps per rank
    precision: str = "fp32"
    sync: str = "last"      # parallel.fsdp_gradient_sync

    @property
    def name(self) -> str:
        return f"{self.model}-k{self.k}-{self.precision}-{self.sync}"


CASES = [Case("gpt2", 2), Case("llama", 2), Case("gpt", 3, sync="every"),
         Case("gpt", 2, precision="bf16")]


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt":
        return GPT(GPTShape(vocab_size=VOCAB, seq_len=SEQ, n_layer=3, n_head=2, d_model=32))
    import transformers

    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=3,
                                         n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config)


def make_problem(case: Case) -> tuple[torch.nn.Module, list[MicroBatch]]:
    model = build_model(case.model)
    gen = torch.Generator().manual_seed(case.k)
    batches = []
    for _ in range(WORLD_SIZE * case.k):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
        batches.append(MicroBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return model, batches


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


class RecordingReduceScatter(DefaultReduceScatter):
    def __init__(self, record) -> None:
        self.record = record

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.record(input_tensor.dtype)
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def run(case: Case, rank: int) -> dict:
    info = dist_info_from_env()
    model, batches = make_problem(case)
    before = full_parameters(model)
    layers = transformer_layers(model)
    wrapped = parallelize(model, "fsdp", torch.device("cpu"), info, precision=case.precision,
                          fsdp_gradient_sync=case.sync)
    micro_step = [0]
    reductions: Counter = Counter()
    reduce_dtypes: set = set()

    def record(dtype):
        reductions[micro_step[0]] += 1
        reduce_dtypes.add(str(dtype))

    compute_dtypes = set()
    for unit in fsdp_units(wrapped):
        unit.set_custom_reduce_scatter(RecordingReduceScatter(record))
    for layer in layers:  # runs after FSDP's own pre-forward hook has gathered the parameters
        layer.register_forward_pre_hook(
            lambda m, args: compute_dtypes.update(str(p.dtype) for p in m.parameters()))

    def counted_loss(model, batch):
        from bigbatch.engine.step import lm_loss_sum

        micro_step[0] += 1
        return lm_loss_sum(model, batch)

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = make_precision(PrecisionConfig(dtype=case.precision), torch.device("cpu"))
    mine = batches[rank * case.k:(rank + 1) * case.k]
    stats = train_step(wrapped, optimizer, mine, precision=precision, dist=info,
                       loss_sum_fn=counted_loss)
    return {"units": [type(u).__name__ for u in fsdp_units(wrapped)],
            "before": before, "after": full_parameters(model), "loss": float(stats.loss),
            "reductions": dict(reductions), "reduce_dtypes": reduce_dtypes,
            "compute_dtypes": compute_dtypes}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {case.name: run(case, rank) for case in CASES}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
