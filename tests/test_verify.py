"""`bigbatch verify` on recipes the planner would size."""

from __future__ import annotations

from bigbatch.cli import main
from conftest import ROOT


def test_verify_accepts_auto_micro_batch(tiny_overrides, capsys, monkeypatch):
    """`batch.micro_batch_size = "auto"` is resolved for the check instead of crashing."""
    monkeypatch.chdir(ROOT)
    code = main(["verify", "configs/tiny.toml", *tiny_overrides, "--batch.micro_batch_size=auto"])
    assert code == 0, capsys.readouterr()
    assert "OK" in capsys.readouterr().out
