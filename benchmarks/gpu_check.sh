#!/usr/bin/env bash
# `make gpu-check`: the CUDA path proven on a GPU, from a source checkout, in about 12 minutes (steps 1-6 in about 5).
#
#   1. the CUDA tests (tests/integration/test_cuda.py, pytest -m cuda)
#   2. a short bf16 and a short fp16 `bigbatch train` on the GPU
#   3. a short bf16 `bigbatch train` with optim.name = "muon" and optim.decay = "wsd"
#   4. `bigbatch plan` of the default recipe with batch.micro_batch_size = "auto" on the GPU
#   5. the training benchmark's GPU rows (benchmarks/bench_gpu.py -> BENCHMARKS.md, bench_gpu)
#   6. one optimizer step of Muon (bf16 Newton-Schulz) against AdamW's, the default recipe's GPT
#      and GPT-2 small (benchmarks/bench_optim_step.py -> BENCHMARKS.md, bench_optim_step_cuda)
#   7. document masking's cost and effect on the default recipe, flex_attention on the GPU
#      (benchmarks/bench_document_mask.py -> BENCHMARKS.md, bench_document_mask_cuda)
#   8. the default recipe's optimizer and schedule: AdamW/Muon x cosine/WSD, 3 seeds, runs side
#      by side on the card (benchmarks/bench_recipe_choice.py -> bench_recipe_choice_cuda)
#
# It uses the Python that holds the CUDA torch ($GPU_PYTHON, default python3): no venv, no
# network. Packages that Python lacks (tomli_w) come as wheels from .gpu-wheels/ (fetched on a
# machine with network by `make gpu-wheels`) into a scratch site directory. Without a CUDA
# device each GPU step says it is skipped and why, and the script still runs to its end; a step
# that fails is named, the rest still run, and the script exits 1 at its end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/bigbatch-gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH/site" \
        .gpu-wheels/*.whl
fi
export PYTHONPATH="$SCRATCH/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -c "import bigbatch.cli, tomli_w" || {
    echo "gpu-check: bigbatch cannot be imported with $PY (missing tomli_w? run 'make gpu-wheels'"
    echo "on a machine with network and bring .gpu-wheels/ along)" >&2; exit 2; }
why_not=$("$PY" -c "
import torch
if not torch.cuda.is_available():
    print('this torch is built without CUDA' if torch.version.cuda is None
          else 'torch sees no CUDA device')")
began=$SECONDS
failed=()  # a GPU is lent for minutes: a failing step is recorded and the next one still runs
step() { echo; echo "== gpu-check $1 ($((SECONDS - began)) s so far)"; current=$1; }
check() { "$@" || { echo "gpu-check: FAILED (exit $?): $current"; failed+=("$current"); }; }
on_gpu() { if [ -n "$why_not" ]; then echo "skipped: $why_not"; else check "$@"; fi; }

step "1/8: CUDA tests"
check "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider tests/integration/test_cuda.py

short_train() {  # a tiny GPT on the embedded corpus, 20 optimizer steps of 8,192 tokens
    name=$1; shift  # the run's name, then overrides: --precision.dtype first
    "$PY" -m bigbatch train configs/tiny.toml --train.device=cuda "$@" \
        --train.max_steps=20 --train.eval_every=10 --train.eval_tokens=8192 \
        --data.cache_dir="$SCRATCH/cache" --out "$SCRATCH/train-$name"
}
for dtype in bf16 fp16; do
    step "2/8: bigbatch train, $dtype"
    on_gpu short_train "$dtype" --precision.dtype="$dtype"
done

step "3/8: bigbatch train, muon + wsd, bf16 (Newton-Schulz in bf16 on the GPU)"
on_gpu short_train muon-wsd --precision.dtype=bf16 --optim.name=muon --optim.decay=wsd

step "4/8: bigbatch plan, default recipe, micro_batch_size = auto"
on_gpu "$PY" -m bigbatch plan --batch.micro_batch_size=auto --train.device=cuda

step "5/8: training benchmark, GPU rows"
check "$PY" benchmarks/bench_gpu.py --rounds 1   # says itself when it skips

step "6/8: optimizer step time, muon against adamw"
check "$PY" benchmarks/bench_optim_step.py --device cuda   # says itself when it skips

step "7/8: document masking on the default recipe (flex_attention)"
on_gpu "$PY" benchmarks/bench_document_mask.py --steps 30 --rounds 1

step "8/8: the default recipe's optimizer and schedule, 3 seeds"
check "$PY" benchmarks/bench_recipe_choice.py --device cuda --jobs 12 --seeds 3 --budgets 30 20

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu-check: ${#failed[@]} step(s) FAILED in $((SECONDS - began)) s:"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu-check: done in $((SECONDS - began)) s${why_not:+ (GPU steps skipped: $why_not)}"
