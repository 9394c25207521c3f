"""`hotswap keys init`: creates a pair, refuses to clobber it, and can be re-run idempotently."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from broker.cli import app


def test_keys_init_is_safe_to_rerun_with_keep_existing(tmp_path: Path) -> None:
    """First run writes the pair; a plain re-run fails (exit 2); --keep-existing exits 0 unchanged."""
    runner = CliRunner()
    first = runner.invoke(app, ["keys", "init", "--dir", str(tmp_path)])
    assert first.exit_code == 0, first.output
    key = (tmp_path / "signing.key").read_bytes()
    again = runner.invoke(app, ["keys", "init", "--dir", str(tmp_path)])
    assert again.exit_code == 2
    kept = runner.invoke(app, ["keys", "init", "--dir", str(tmp_path), "--keep-existing"])
    assert kept.exit_code == 0, kept.output
    assert (tmp_path / "signing.key").read_bytes() == key


def test_keep_existing_refuses_a_mismatched_pair(tmp_path: Path) -> None:
    """A public key that is not the private key's half is an error, not silently kept."""
    runner = CliRunner()
    assert runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / "a")]).exit_code == 0
    assert runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / "b")]).exit_code == 0
    (tmp_path / "a" / "signing.pub").write_bytes((tmp_path / "b" / "signing.pub").read_bytes())
    result = runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / "a"), "--keep-existing"])
    assert result.exit_code == 2
