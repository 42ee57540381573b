"""`infopo export --merged`: the LoRA folded into the un-quantised base, saved as a plain transformers model.

The base is loaded from its source in full precision (never from the 4-bit copy the run trained on:
merging into NF4 weights would bake the quantisation error into the export), the adapter is merged
with peft, and the folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infopo_cli import files
from infopo_cli.config import DTYPES
from infopo_cli.errors import ConfigError
from infopo_cli.export.outputs import claim_folder
from infopo_cli.model.source import mark_merged
from infopo_cli.train.checkpoint import complete_checkpoints
from infopo_cli.presets import load_run_config
from infopo_cli.reporting.model_card import write_merged_card


@dataclass(frozen=True)
class AdapterSource:
    """What an export merges: a base model and the adapter folder trained on it."""

    base: str      # what the run trained on: a folder, a hub id or the embedded default
    adapter: Path  # a folder with adapter_config.json
    # adapters whose change is also in it (the one its run started from, the run's checkpoints): the merged model
    # holds them too, and refuses them as a base with them on top
    related: tuple[Path, ...] = ()


def from_run(run_dir: str | Path) -> AdapterSource:
    """The base model and adapter of a run folder, from its config.toml."""
    run = Path(run_dir)
    if run.is_file():
        raise ConfigError(f"{run}: a file, not a run folder; pass a run folder written by `infopo train`, or --base "
                          "and --adapter")
    if not (run / "adapter_config.json").is_file():
        if who := files.RunLock(run).holder():
            raise ConfigError(f"{run} is being trained now ({who}) and has no adapter yet; export it when the run ends")
        if (run / "config.toml").is_file() and (saved := complete_checkpoints(run)):
            raise ConfigError(f"{run} has no final adapter: the run stopped before writing it. `infopo train --resume "
                              f"{run}` finishes it, or export its newest checkpoint: --base "
                              f"{load_run_config(run).model} --adapter {saved[-1]}")
        raise ConfigError(f"{run} has no adapter (adapter_config.json); pass a run folder written by `infopo train`, "
                          "or --base and --adapter")
    if not (run / "config.toml").is_file():
        raise ConfigError(f"{run} has no config.toml naming its base model; pass --base")
    cfg = load_run_config(run)
    started = [Path(cfg.init_adapter).expanduser()] if cfg.init_adapter else []
    return AdapterSource(cfg.model, run, tuple(started + complete_checkpoints(run)))


def default_output(source: AdapterSource, kind: str, quant: str = "") -> Path:
    """RUN/export/<run>-<quant>.gguf, RUN/export/<run>-adapter-<quant>.gguf or RUN/export/merged/: next to the adapter
    they come from."""
    folder, name = source.adapter / "export", source.adapter.resolve().name
    return {"gguf": folder / f"{name}-{quant}.gguf", "adapter": folder / f"{name}-adapter-{quant}.gguf",
            "bundle": folder / f"{name}.tar"}.get(kind, folder / "merged")


def merged_model(source: AdapterSource, dtype: str = "fp32"):
    """(merged transformers model, tokenizer), in memory."""
    import torch

    from infopo_cli.model.stack import import_bitsandbytes, library_reading, load_tokenizer, quiet_peft, resolve_source

    import_bitsandbytes()  # before peft imports it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # infopo says what it does; per-tensor bars from transformers are noise

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    base_path = resolve_source(source.base)
    with library_reading(source.base):
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, DTYPES[dtype]),
                                                    device_map={"": "cpu"}, trust_remote_code=False)
    with library_reading(str(source.adapter)), quiet_peft():
        model = PeftModel.from_pretrained(base, str(source.adapter)).merge_and_unload()
    tokenizer_dir = source.adapter if (source.adapter / "tokenizer_config.json").is_file() else base_path
    return model, load_tokenizer(str(tokenizer_dir))


def export_merged(source: AdapterSource, out: Path, dtype: str = "fp32", overwrite: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """Write the merged model, its tokenizer and model card to `out`; an existing output is replaced only with
    `overwrite`, and only once the new one is complete."""
    for line in files.clean_temporaries(out.parent):  # first: it may put back a folder a crash left aside
        log(line)
    claim_folder(out, source.adapter, overwrite, source.base)
    model, tokenizer = merged_model(source, dtype)
    files.check_free_space(out.parent, sum(p.numel() * p.element_size() for p in model.parameters()))
    with files.folder(out) as tmp:  # with --overwrite, the old folder goes only once the new one is complete
        model.config.use_cache = True  # the run turned the KV cache off for training; inference wants it
        model.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)  # with its chat template
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)

        write_merged_card(tmp, source.adapter, source.base, out)  # README.md: the run's card, for the merged model
        mark_merged(tmp, source.adapter, source.base, source.related)  # `--base OUT` with one of them is refused
    return out
