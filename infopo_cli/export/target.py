"""What `infopo export` reads and where it writes: a run folder (the newest under ./runs by default) or --base with
--adapter, and the output --merged or --gguf names (by default RUN/export/merged/ or RUN/export/RUN-QUANT.gguf, next
to the adapter). Replacing an existing output is refused by export/outputs.py when the export claims it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infopo_cli.errors import ConfigError
from infopo_cli.export.merged import AdapterSource, default_output, from_run
from infopo_cli.model.source import check_not_merged_in
from infopo_cli.reporting.runs import is_run, newest_run


@dataclass(frozen=True)
class ExportTarget:
    """What one `infopo export` reads, where it writes and in which form."""

    source: AdapterSource
    out: Path
    kind: str                  # "merged", "gguf", "adapter" (the LoRA alone as a llama.cpp adapter GGUF) or "bundle"
    newest: Path | None = None  # the run found under ./runs when none was named


def resolve(run_dir: str | None, merged: str | None, gguf: str | None, quant: str, base: str | None,
            adapter: str | None, gguf_adapter: str | None = None, bundle: str | None = None) -> ExportTarget:
    """The export the flags ask for; `merged`/`gguf`/`gguf_adapter` is "" for the default path (the flag given
    without a value)."""
    asked = [(kind, value) for kind, value in (("merged", merged), ("gguf", gguf), ("adapter", gguf_adapter),
                                               ("bundle", bundle)) if value is not None]
    if len(asked) != 1:
        raise ConfigError("pass exactly one of --merged [OUT_DIR], --gguf [OUT.gguf], --gguf-adapter [OUT.gguf] or "
                          "--bundle [OUT.tar]")
    if asked[0][0] == "bundle" and (base or adapter):
        raise ConfigError("--bundle packs a run folder: pass the run, not --base/--adapter")
    kind, given = asked[0]
    if given and not run_dir and not base and Path(given).is_dir() and is_run(Path(given)):
        run_dir, given = given, ""  # `infopo export --gguf runs/my-run`: the folder is the run, not the output
    if run_dir and (base or adapter):
        raise ConfigError("pass a run folder or --base with --adapter, not both")
    newest = None
    if base or adapter:
        if not (base and adapter):
            raise ConfigError("--base and --adapter go together")
        source = AdapterSource(base, Path(adapter))
        if not (source.adapter / "adapter_config.json").is_file():
            raise ConfigError(f"{adapter} has no adapter_config.json")
        check_not_merged_in(base, source.adapter, "--base")
    else:
        if not run_dir:
            newest = newest_run()
            run_dir = str(newest)
        source = from_run(run_dir)
    return ExportTarget(source, Path(given) if given else default_output(source, kind, quant), kind, newest)


def base_model(run_dir: str | None, base: str | None) -> str:
    """The model whose GGUF sizes `--quant list` shows: --base's, else the run's (the newest by default)."""
    return base or from_run(run_dir or newest_run()).base
