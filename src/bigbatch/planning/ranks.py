"""Whether N ranks pay, for a finished run (`bigbatch plan --world-size N --from RUN_DIR`).

Each rank keeps the run's share of a step (its micro-batch x its accumulation), so N ranks make a
global batch N times that share. Past the critical batch, a larger batch buys few steps with many
tokens (McCandlish et al. 2018; Zhang et al. 2024): ranks pay while the global batch stays within
it. The critical batch is the one `bigbatch cbs` measured (RUN_DIR/cbs.json, at its last
checkpoint) or, where cbs was not run, the run's last online noise scale B_simple (gns_tokens in
metrics.jsonl), a noisier proxy, biased under Adam (Merrill et al. 2025).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from bigbatch.batch import split_batch
from bigbatch.config.files import load_config
from bigbatch.errors import UsageError
from bigbatch.tasks import task_of


@dataclass
class RankAdvice:
    world_size: int
    critical_batch_tokens: float
    source: str                   # where the critical batch comes from, in words
    micro_batch_tokens: int       # the run's micro-batch: sequences x seq_len
    num_micro_steps: int          # the run's accumulation per rank
    at_least: bool = False        # cbs found every batch it tried within tolerance

    @property
    def per_rank_tokens(self) -> int:
        return self.micro_batch_tokens * self.num_micro_steps

    @property
    def global_tokens(self) -> int:
        return self.per_rank_tokens * self.world_size

    @property
    def pays(self) -> bool:
        return self.global_tokens <= self.critical_batch_tokens

    @property
    def max_ranks(self) -> int:
        """Ranks at the run's share whose global batch stays within the critical batch."""
        return int(self.critical_batch_tokens // self.per_rank_tokens)

    @property
    def max_micro_steps(self) -> int:
        """Accumulation per rank at N ranks that keeps the batch within the critical batch."""
        return int(self.critical_batch_tokens // (self.world_size * self.micro_batch_tokens))

    def to_dict(self) -> dict:
        return {**asdict(self), "per_rank_tokens": self.per_rank_tokens,
                "global_tokens": self.global_tokens, "pays": self.pays,
                "max_ranks": self.max_ranks, "max_micro_steps": self.max_micro_steps}

    def lines(self) -> list[str]:
        crit = f"{'at least ' if self.at_least else ''}{self.critical_batch_tokens:,.0f}"
        head = (f"ranks: {self.world_size} x the run's {self.per_rank_tokens:,} tokens per rank "
                f"({self.micro_batch_tokens:,} x {self.num_micro_steps} micro-steps) = "
                f"{self.global_tokens:,} tokens per step against a critical batch of {crit} "
                f"tokens ({self.source})")
        if self.pays:
            return [head, f"{self.world_size} rank(s) pay: the batch stays within the critical "
                          f"batch, so they cut the steps {self.world_size}-fold for about the "
                          "same tokens"]
        if self.max_micro_steps >= 1:
            fix = (f"to use {self.world_size} ranks, give each {self.max_micro_steps} micro-"
                   f"step(s) (--batch.global_tokens="
                   f"{self.world_size * self.micro_batch_tokens * self.max_micro_steps})")
        else:
            fix = (f"even one micro-step per rank ({self.world_size * self.micro_batch_tokens:,}"
                   f" tokens) is past it: {self.world_size} ranks waste tokens at any "
                   "accumulation")
        within = (f"up to {self.max_ranks} rank(s) at that share stay within it"
                  if self.max_ranks else "the run's own batch per rank is past it already")
        return [head, f"{self.world_size} rank(s) do not pay at the run's share: past the "
                      f"critical batch, more tokens per step buy few steps; {within}; {fix}"]


def critical_batch_of_run(run_dir: Path) -> tuple[float, str, bool]:
    """(tokens, where they come from, whether only a lower bound): cbs.json's last checkpoint,
    else the run's last online noise scale."""
    cbs = run_dir / "cbs.json"
    if cbs.is_file():
        final = json.loads(cbs.read_text())["final"]
        last = json.loads(cbs.read_text())["points"][-1]
        return (float(final["critical_batch_tokens"]),
                f"measured by bigbatch cbs at step {final['step']}",
                last["first_beyond_tokens"] is None)
    noise = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("gns_tokens"):
            noise = (row["gns_tokens"], row["step"])
    if noise is None:
        raise UsageError(f"{run_dir} has neither cbs.json nor an online noise scale "
                         "(gns_tokens) in metrics.jsonl: run bigbatch cbs on it first")
    return (float(noise[0]), f"the online noise scale B_simple at step {noise[1]}; "
            f"bigbatch cbs {run_dir} measures it directly", False)


def rank_advice(run_dir: Path, world_size: int) -> RankAdvice:
    if not (run_dir / "config.toml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        raise UsageError(f"--from {str(run_dir)!r} is not a finished run directory (it needs "
                         "config.toml and metrics.jsonl)")
    cfg = load_config(run_dir / "config.toml")
    if not isinstance(cfg.batch.micro_batch_size, int) or not task_of(cfg).measures_critical_batch:
        raise UsageError(f"--from {str(run_dir)!r}: rank advice needs a language-model run with "
                         "a resolved batch.micro_batch_size")
    info = run_dir / "run_info.json"
    run_ranks = json.loads(info.read_text()).get("world_size", 1) if info.is_file() else 1
    micro = cfg.batch.micro_batch_size * cfg.data.seq_len
    accumulation = split_batch(cfg.batch.global_tokens, cfg.data.seq_len,
                              cfg.batch.micro_batch_size, run_ranks).num_micro_steps
    tokens, source, at_least = critical_batch_of_run(run_dir)
    return RankAdvice(world_size, tokens, source, micro, accumulation, at_least)


def plan_output(recipe: str | None, overrides: list[str], world_size: int,
                run_dir: Path | None, as_json: bool) -> str:
    """`bigbatch plan`: the memory plan (of the recipe, or of the run's config.toml with
    `--from`) explained, or as JSON; with `--from`, whether `world_size` ranks pay, too."""
    from bigbatch.planning.planner import describe_plan, plan

    advice = rank_advice(run_dir, world_size) if run_dir else None
    cfg = load_config(recipe or (run_dir and run_dir / "config.toml"), overrides)
    memory_plan = plan(cfg, world_size=world_size)
    if as_json:
        return json.dumps({**memory_plan.to_dict(),
                           **({"ranks": advice.to_dict()} if advice else {})})
    return "\n".join(describe_plan(memory_plan) + (advice.lines() if advice else []))
