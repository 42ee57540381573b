"""`infopo export RUN --bundle [OUT]`: the run packed to share (infopo_cli/bundles.py), its latest checkpoint on
request; the output claimed before anything is read."""

from __future__ import annotations

from pathlib import Path

from infopo_cli import files
from infopo_cli.bundles import SUFFIXES, write_bundle
from infopo_cli.errors import ConfigError
from infopo_cli.train.checkpoint import latest_checkpoint


def export_bundle(run: Path, out: Path, with_checkpoint: bool = False, overwrite: bool = False) -> dict:
    """Write the bundle of `run` to `out`; returns its manifest."""
    if not out.name.lower().endswith(SUFFIXES):
        raise ConfigError(f"--bundle {out}: name the file .tar, .tar.gz, .tgz or .zip")
    files.claim_target(out, overwrite)
    files.check_writable(out, "--bundle")
    checkpoint = latest_checkpoint(run) if with_checkpoint else None
    if with_checkpoint and checkpoint is None:
        raise ConfigError(f"{run} has no complete checkpoint to include")
    return write_bundle(run, out, checkpoint)
