"""Document masking (model/document_attention.py, the GPT's and Hugging Face models' position_ids).

Invariants, in fp32 on CPU:
- every document inside a packed row has the logits it has run alone (1e-5), for the built-in
  GPT with either attention kernel, GPT-2 and a Llama-style model from transformers;
- no gradient crosses a document boundary: a later document's logits do not depend on an
  earlier document's input embeddings (their gradient is exactly zero);
- without position_ids the GPT is bitwise the plain causal GPT;
- flex_attention's block mask allows exactly what the boolean mask allows, and its attention
  equals the boolean mask's (forward; flex has no CPU backward: tests/integration/test_cuda.py
  compares both directions on a GPU);
- a model that ignores position_ids is refused in one line.
"""

from __future__ import annotations

import pytest
import torch

from bigbatch.batch import MicroBatch
from bigbatch.data.packing import document_positions
from bigbatch.errors import UsageError
from bigbatch.model.document_attention import (
    DocumentMask,
    document_causal_mask,
    document_ids,
    document_mask_mod,
)
from bigbatch.model.gpt import GPT, GPTShape

EOT = 0
SHAPE = GPTShape(vocab_size=64, seq_len=32, n_layer=2, n_head=2, d_model=16)
LENGTHS = (5, 9, 3, 7)  # documents of the packed row, each ending in EOT; the last one cut


def packed_row(seed: int = 1) -> tuple[torch.Tensor, list[slice]]:
    """(1, 24) token ids of documents each followed by EOT, and each document's span."""
    generator = torch.Generator().manual_seed(seed)
    parts, spans, start = [], [], 0
    for length in LENGTHS:
        parts += [torch.randint(1, SHAPE.vocab_size, (length - 1,), generator=generator),
                  torch.tensor([EOT])]
        spans.append(slice(start, start + length))
        start += length
    ids = torch.cat(parts)[:-1].unsqueeze(0)  # the row ends mid-document (no final EOT)
    spans[-1] = slice(spans[-1].start, ids.size(1))
    return ids, spans


def assert_documents_run_alone(logits_of, ids: torch.Tensor, spans: list[slice]) -> None:
    positions = document_positions(ids, EOT)
    packed = logits_of(ids, positions)
    for span in spans:
        alone = logits_of(ids[:, span], None)
        assert torch.allclose(packed[:, span], alone, rtol=0, atol=1e-5), \
            (span, float((packed[:, span] - alone).abs().max()))


@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
def test_gpt_documents_in_a_packed_row_equal_each_run_alone(kernel):
    torch.manual_seed(0)
    model = GPT(SHAPE, attention=kernel).eval()
    ids, spans = packed_row()
    with torch.no_grad():
        assert_documents_run_alone(lambda i, p: model(i, position_ids=p), ids, spans)


@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
def test_no_gradient_crosses_a_document_boundary(kernel):
    torch.manual_seed(0)
    model = GPT(SHAPE, attention=kernel)
    ids, spans = packed_row()
    embeddings = model.wte(ids).detach().requires_grad_(True)
    model.wte.forward = lambda _: embeddings  # the model reads these embeddings, gradients kept
    logits = model(ids, position_ids=document_positions(ids, EOT))
    later = spans[1]
    logits[:, later].sum().backward()
    before = embeddings.grad[:, :later.start]
    assert torch.equal(before, torch.zeros_like(before))
    assert embeddings.grad[:, later].abs().sum() > 0  # the document's own inputs do matter


def test_without_position_ids_the_gpt_is_bitwise_unchanged():
    """The plain causal GPT, through the same weights: SDPA with is_causal, positions 0..T-1;
    with position_ids of one whole-row document it agrees to rounding, not bitwise."""
    torch.manual_seed(0)
    model = GPT(SHAPE).eval()
    ids, _ = packed_row()
    with torch.no_grad():
        x = model.wte(ids) + model.wpe(torch.arange(ids.size(1)))
        for block in model.blocks:
            attn = block.attn
            h = block.ln_1(x)
            q, k, v = (t.view(1, ids.size(1), attn.n_head, -1).transpose(1, 2)
                       for t in attn.qkv(h).split(SHAPE.d_model, dim=2))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + attn.proj(y.transpose(1, 2).reshape(1, ids.size(1), SHAPE.d_model))
            x = x + block.mlp(block.ln_2(x))
        assert torch.equal(model(ids), model.lm_head(model.ln_f(x)))
        one_document = torch.arange(ids.size(1)).unsqueeze(0)
        assert torch.allclose(model(ids, position_ids=one_document), model(ids), atol=1e-5)


def test_micro_batch_passes_position_ids_only_when_set():
    ids, _ = packed_row()
    plain = MicroBatch(ids, ids)
    assert plain.model_inputs().keys() == {"input_ids"}
    assert plain.to(torch.device("cpu")).position_ids is None
    masked = MicroBatch(ids, ids, document_positions(ids, EOT))
    assert masked.model_inputs().keys() == {"input_ids", "position_ids"}
    assert torch.equal(masked.first_rows(1).position_ids, masked.position_ids)


@pytest.mark.slow  # flex_attention builds its mask and runs unfused: ~15 s on a 2-core CPU
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_and_attention_equal_the_boolean_mask():
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    ids, _ = packed_row()
    positions = document_positions(torch.cat([ids, ids.flip(1)]), EOT)
    batch, time = positions.shape
    dense = flex_attention.create_mask(document_mask_mod(document_ids(positions)), batch, 1,
                                       time, time, device="cpu")
    assert torch.equal(dense, document_causal_mask(positions))
    q, k, v = torch.randn(3, batch, 2, time, 8, generator=torch.Generator().manual_seed(0))
    by_flex = DocumentMask.build(positions, use_flex=True).attend(q, k, v, False, 0.0)
    by_mask = DocumentMask.build(positions, use_flex=False).attend(q, k, v, False, 0.0)
    assert torch.allclose(by_flex, by_mask, atol=1e-5)


# -- Hugging Face causal LMs, from tiny configs (no download) ---------------------------------

transformers = pytest.importorskip("transformers")


def tiny_gpt2(attention: str):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=SHAPE.vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=EOT, eos_token_id=EOT, attn_implementation=attention))


def tiny_llama(attention: str):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=SHAPE.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        bos_token_id=EOT, eos_token_id=EOT, attn_implementation=attention))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_hf_documents_in_a_packed_row_equal_each_run_alone(build, attention):
    from bigbatch.model.hf_lm import require_packed_sequences

    torch.manual_seed(0)
    model = build(attention)
    require_packed_sequences(model, "hf-config:tiny")  # turns the generation cache off
    model.eval()
    ids, spans = packed_row()
    with torch.no_grad():
        assert_documents_run_alone(
            lambda i, p: model(**MicroBatch(i, i, p).model_inputs()).logits, ids, spans)


def test_a_model_that_ignores_position_ids_is_refused():
    from bigbatch.model.hf_lm import require_packed_sequences

    class IgnoresPositions(torch.nn.Module):  # attends across the whole row, like GPT-2 did
        def __init__(self) -> None:
            super().__init__()
            self.config = transformers.PretrainedConfig()
            self.model = GPT(SHAPE)

        def get_input_embeddings(self):
            return self.model.wte

        def forward(self, input_ids, position_ids=None):
            return transformers.modeling_outputs.CausalLMOutput(logits=self.model(input_ids))

    with pytest.raises(UsageError, match=r"data.document_mask = true: model.source = "
                                         r"'hf:odd' \(IgnoresPositions\) .* set "
                                         r"data.document_mask = false"):
        require_packed_sequences(IgnoresPositions(), "hf:odd")
