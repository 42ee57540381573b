"""Something to ask: a run folder, an adapter folder with --base, a merged export or any transformers model folder.

A run's base is loaded as the run loaded it (its config.toml: model, dtype, attention kernel), 4-bit NF4 only
where CUDA is available: on a CPU the plain weights answer (bitsandbytes' CPU 4-bit path is there to train on
the layout a GPU run would use, not to serve). The run's adapter goes on top with peft, and the *base* answers
with the adapter disabled: the same loaded weights, never a second copy. A run started from --init-adapter
compares with that adapter instead, as its training did (its reference).

A merged export or plain model folder has no base inside it: a comparison needs --base, which then loads a
second model. Finding what a path is happens before torch is imported, so a wrong path is one instant line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infopo_cli.bundles import cached, is_bundle
from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError, ModelError
from infopo_cli.model.source import ADAPTER_WEIGHTS, check_not_merged_in, held_adapters
from infopo_cli.presets import load_run_config
from infopo_cli.reporting.runs import newest_run

RUNS = Path("runs")


@dataclass(frozen=True)
class Target:
    """What a path names, before anything is loaded."""

    path: Path
    kind: str                            # run, adapter, model (merged export or any model folder), gguf
    base: str | None = None              # the base model: the run's, or --base
    config: TrainConfig | None = None    # the run's settings (also for one of its checkpoint folders)

    @property
    def label(self) -> str:
        return {"run": "run", "adapter": "adapter", "model": "model folder", "gguf": "GGUF file"}[self.kind]

    @property
    def folder(self) -> Path:
        """Where outputs about it go by default (RUN/eval/...)."""
        return self.path.parent if self.kind == "gguf" else self.path


def newest(runs: Path = RUNS) -> Path:
    """The newest run under ./runs, as `infopo export` picks it."""
    try:
        return newest_run(runs)
    except ConfigError:
        raise ConfigError(f"no finished run under {runs}/; pass a run folder (or a merged export, or an adapter "
                          "folder with --base)") from None


def find_target(target: str | Path | None, base: str | None = None, log: Callable[[str], None] = print) -> Target:
    """What `target` is (the newest run when None), checked for what loading it needs. Torch-free."""
    if target is None:
        path = newest(RUNS)
        log(f"the newest run: {path}")
    else:
        path = Path(target).expanduser()
    if is_bundle(path):  # a shared run: unpacked once into the cache, every file checked against its manifest
        path = cached(path)
        log(f"the bundle's run, unpacked: {path}")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        if base:
            raise ConfigError(f"{path}: a GGUF file holds the whole model; --base does not apply")
        return Target(path, "gguf")
    if not path.exists():
        raise ConfigError(f"{path}: no such folder (pass a run folder written by `infopo train`, an adapter folder "
                          "with --base, or a model folder)")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a folder (pass a run folder, an adapter folder with --base, a model folder, "
                          "a .gguf file or a run bundle: .tar, .tar.gz or .zip)")
    if (path / "adapter_config.json").is_file():
        if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):  # peft would look for them on the hub
            raise ConfigError(f"{path}: adapter_config.json but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): "
                              "copied without them, or a run that has not finished (pass one of its checkpoint-N folders)")
        run = next((p for p in (path, path.parent) if (p / "config.toml").is_file()), None)
        config = load_run_config(run) if run else None  # a checkpoint-N folder: its run's settings
        if base and config is not None and not _same_model(base, config.model):
            raise ConfigError(f"--base {base}: {run} was trained on {config.model}, and its adapter means nothing on "
                              "another base; drop --base (it is for an adapter folder without its run's config.toml)")
        if base:
            check_not_merged_in(base, path, "--base")
            return Target(path, "adapter", base, config)
        if config is None:
            raise ConfigError(f"{path} is an adapter folder without a run's config.toml: pass --base BASE (the model "
                              f"it was trained on{_named_base(path)})")
        return Target(path, "run", config.model, config)
    if (path / "config.toml").is_file():
        raise ConfigError(f"{path} has a config.toml but no adapter yet (adapter_config.json): the run has not "
                          "finished; pass one of its checkpoint-N folders")
    if (path / "config.json").is_file():
        return Target(path, "model", base)
    raise ConfigError(f"{path}: not a run folder, adapter folder or model folder (no config.toml, "
                      "adapter_config.json or config.json)")


def _named_base(folder: Path) -> str:
    try:
        named = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        return ""
    return f"; its adapter_config.json names {named}" if named else ""


@dataclass
class LoadedModel:
    """The model to ask; `base()` gives the base to compare with (the same weights with the adapter off)."""

    model: Any                           # the tuned model: a peft model, or a plain transformers model
    tokenizer: Any
    name: str                            # what the user passed, for messages
    has_adapter: bool
    target: Target
    reference: Any = None                # a second model: --base for a merged/plain model folder
    base_label: str = "base"             # what `base()` is, in words
    notes: list[str] = field(default_factory=list)

    @property
    def can_compare(self) -> bool:
        return self.has_adapter or self.reference is not None

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    def no_base_reason(self) -> str:
        """Why this model cannot be compared with its base, and the flag that fixes it."""
        held = held_adapters(str(self.target.path))  # a merged export names the base it was merged from
        merged_from = f": it was merged from {held['base']}" if held and isinstance(held.get("base"), str) else ""
        return (f"{self.name} is a {self.target.label} with no base inside it to compare with; pass --base BASE "
                f"(a second model is loaded{merged_from})")

    @contextlib.contextmanager
    def base(self) -> Iterator[Any]:
        """The base (or the run's reference), under no-grad, for as long as the block runs."""
        from infopo_cli.model.stack import reference_mode

        if self.has_adapter:
            with reference_mode(self.model) as model:  # the adapter off, or a run's --init-adapter (its reference)
                yield model
        elif self.reference is not None:
            import torch

            with torch.no_grad():
                yield self.reference
        else:
            raise ConfigError(self.no_base_reason())


def inference_precision(dtype: str):
    """The run's dtype, unless this machine would only emulate it (a bf16 run read on a CPU without bf16)."""
    import torch

    from infopo_cli.model.precision import choose

    precision = choose(dtype)
    if precision.device == "cpu" and precision.dtype != torch.float32 and choose("auto").dtype != precision.dtype:
        return choose("auto")
    return precision


def load_target(target: Target, log: Callable[[str], None] = print) -> LoadedModel:
    """Load what `find_target` found (not a GGUF file: see gguf_model)."""
    import torch
    from transformers.utils import logging as hf_logging

    from infopo_cli.model import stack

    hf_logging.disable_progress_bar()  # per-tensor loading bars are noise next to infopo's own lines
    if target.kind == "gguf":
        raise ConfigError(f"{target.path}: a GGUF file is read by llama.cpp; `infopo generate` and `infopo chat` "
                          "take it, `infopo eval` needs the run folder or a merged export")
    cuda = torch.cuda.is_available()
    notes: list[str] = []
    if target.kind == "model":
        cfg = TrainConfig(model=str(target.path), load_in_4bit=False, dtype="auto")
        model = _base(str(target.path), cfg, log)
        reference = None
        if target.base:  # a second model: the only way to compare a merged export with what it came from
            log(f"loading --base {target.base} to compare with (a second model)")
            reference = _base(stack.resolve_source(target.base, log=log), dataclasses.replace(cfg, model=target.base), log)
        return LoadedModel(model, stack.load_tokenizer(str(target.path)), str(target.path), False, target,
                           reference, "base (--base)", notes)

    cfg = target.config if target.kind == "run" else _adapter_config(target)
    if target.base:
        cfg = dataclasses.replace(cfg, model=target.base)
    cfg = dataclasses.replace(cfg, load_in_4bit=cfg.load_in_4bit and cuda)
    if target.config is not None and target.config.load_in_4bit and not cuda:
        notes.append("the run trained on the 4-bit NF4 base; without CUDA the unquantised base is read, so its numbers "
                     "differ slightly from the run's own evaluation")
    source = stack.resolve_source(cfg.model, log=log)
    base = _base(source, cfg, log)
    model = _attach(base, target.path)
    label = "base (adapter disabled)"
    if cfg.init_adapter:  # the run's reference was its init adapter: compare with that, as training did
        label = _attach_reference(model, Path(cfg.init_adapter), notes)
    tokenizer_dir = str(target.path) if (target.path / "tokenizer_config.json").is_file() else source
    return LoadedModel(model, stack.load_tokenizer(tokenizer_dir), str(target.path), True, target, None, label, notes)




def _adapter_config(target: Target) -> TrainConfig:
    """An adapter folder with --base: the run's own settings when it is one of a run's checkpoints, else defaults."""
    return target.config if target.config is not None else TrainConfig(model=target.base or "", dtype="auto")


def _base(source: str, cfg: TrainConfig, log: Callable[[str], None]):
    from infopo_cli.model import stack

    precision = inference_precision(cfg.dtype)
    model = stack.load_base(source, cfg, precision)
    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    return model.eval()


def _attach(base, adapter: Path):
    from peft import PeftModel

    from infopo_cli.model.stack import quiet_peft

    try:
        with quiet_peft():
            return PeftModel.from_pretrained(base, str(adapter)).eval()
    except Exception as err:  # another base, r or target modules; a truncated or unreadable adapter
        first = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load the adapter {adapter} onto its base: {first}") from None


def _attach_reference(model, init_adapter: Path, notes: list[str]) -> str:
    from infopo_cli.model.stack import REFERENCE, quiet_peft

    if not (init_adapter / "adapter_config.json").is_file():
        notes.append(f"the run's --init-adapter {init_adapter} is gone: the base (adapter disabled) stands in for it")
        return "base (adapter disabled)"
    with quiet_peft():
        model.load_adapter(str(init_adapter), adapter_name=REFERENCE, is_trainable=False)
    model.set_adapter("default")
    notes.append(f"the run started from --init-adapter {init_adapter}: 'base' is that adapter (the run's reference)")
    return "init adapter (the run's reference)"


def _same_model(given: str, trained: str) -> bool:
    """Whether --base names the model a run was trained on (the same folder or file however spelt, or the same hub id)."""
    here, there = Path(given).expanduser(), Path(trained).expanduser()
    if here.exists() and there.exists():
        return here.resolve() == there.resolve()
    return given.rstrip("/") == trained.rstrip("/")

