"""The `infopo` command line. Flags become a TrainConfig; the work happens elsewhere.

torch and transformers are imported inside the commands that need them, so `--help` is instant.
Errors a user can fix print as one red line (exit 2 for bad input); `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from shlex import quote
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from infopo_cli import __version__
from infopo_cli.cli_options import check_text, default_or_path, given, named_path, settings_options
from infopo_cli.config import CLI_SETTINGS, help_for
from infopo_cli.errors import InfopoError
from infopo_cli.inference.answers import RULE as ANSWER_RULE  # standard library only: --help stays instant
from infopo_cli.train.stops import StopNow  # standard library only: --help stays instant
from infopo_cli.train.compare import OWN_FLAGS  # torch-free too

app = typer.Typer(
    help="Align a language model with preference data (InfoPO and relatives), QLoRA on one GPU or a CPU.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich",
)
data_app = typer.Typer(help="Inspect preference data.", no_args_is_help=True, add_completion=False)
presets_app = typer.Typer(help="List the presets, or show one.", invoke_without_command=True, add_completion=False)
app.add_typer(presets_app, name="presets")
app.add_typer(data_app, name="data")
# emoji off: a file named a:cat:b.jsonl must print as itself (rich's escape() leaves :codes: alone)
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


def _version(value: bool) -> None:
    if value:
        console.print(f"infopo {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
) -> None:
    """infopo: InfoPO preference alignment that fits one consumer GPU."""


# options that several commands share
Preset = Annotated[Optional[str], typer.Option("--preset", "-p", callback=named_path, help="Preset name (see `infopo presets`) or a .toml file (default smollm2-135m).", show_default=False)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Check the command (preset, flags, loss, data: every row) and say what the run would do; load no model, write nothing.", rich_help_panel="Output")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks.", rich_help_panel="Output")]


@app.command()
@settings_options(CLI_SETTINGS)
def train(
    preset: Preset = None,
    resume: Annotated[Optional[str], typer.Option("--resume", callback=named_path, help="Continue a stopped run folder from its newest checkpoint, exactly (its own settings; --max-steps/--epochs may change its length).", rich_help_panel="Output")] = None,
    dry_run: DryRun = False,
    debug: Debug = False,
    *,
    settings: dict[str, Any],
) -> None:
    """Train a LoRA adapter on preference pairs. With no arguments: SmolLM2-135M on the bundled data.

    [dim]infopo train --preset llama3-8b-qlora --data my_prefs.jsonl --loss infopo[/]
    """

    from infopo_cli import presets
    from infopo_cli.config import override

    if resume:
        flags = {**settings, **({"preset": preset} if preset else {})}
        from infopo_cli.bundles import is_bundle

        if is_bundle(resume):
            return _resume_bundle(Path(resume), flags, dry_run)
        return _resume(Path(resume), flags, dry_run)

    from infopo_cli.losses.registry import load_preset

    cfg = override(load_preset(preset or presets.DEFAULT_PRESET), settings, source="command line")
    if dry_run:  # every check below and more
        return _dry_run(cfg)
    cfg.validate()
    from infopo_cli.losses.registry import resolve  # light: imports torch only for tensors' types

    resolve(cfg.loss, cfg.loss_overrides())  # an unknown loss or a flag it does not take: one line, before loading
    _launch_if_asked(cfg.nproc)

    from infopo_cli.train.progress import Reporter
    from infopo_cli.train.recipe import train as run_training  # imports torch: only now

    _finish(run_training(cfg, Reporter(console)))


def _train_flags(params: dict) -> dict:
    """`infopo train`'s parsed parameters as the settings given (and --preset)."""
    return given(params, ("preset", *CLI_SETTINGS))


def _dry_run(cfg, resume=None) -> None:
    """`--dry-run`: every check a run makes before its model loads, then what it would do; nothing is written.
    `resume`: the folder the run continues in (or a comparison's parent), which may hold files already."""

    from infopo_cli.train import preflight
    from infopo_cli.train.recipe import default_output

    output = resume or (Path(cfg.output) if cfg.output else default_output(cfg))
    checked = preflight.check(cfg, output, fresh=resume is None)
    for line in preflight.describe(checked, output, resuming=resume is not None):
        console.print(escape(line), highlight=False, soft_wrap=True)
    console.print("[green]dry run: the command is valid[/]; no model was loaded and nothing was written", highlight=False)


def _resume(run_dir, flags: dict, dry_run: bool = False) -> None:
    from infopo_cli.errors import ConfigError
    from infopo_cli.presets import load_run_config
    from infopo_cli.train.resume import enter_start_folder, resumed_config

    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.toml)" if run_dir.exists() else
                          f"--resume {run_dir}: no such run folder")
    said: list[str] = []
    saved, here = load_run_config(run_dir, where_started=False), Path.cwd()  # config.toml is rewritten
    run_dir, flags = enter_start_folder(run_dir, saved, flags, said.append)
    cfg = resumed_config(saved, flags, run_dir, said.append)
    from infopo_cli.train.launch import under_launcher

    if not _rank() and (dry_run or cfg.nproc == 1 or under_launcher()):  # else the processes it launches say it
        for line in said:
            console.print(escape(line), highlight=False)
    if dry_run:
        return _dry_run(cfg, run_dir)
    _launch_if_asked(cfg.nproc, here)  # from here: each process reads the command line as it was typed
    from infopo_cli.train.progress import Reporter
    from infopo_cli.train.recipe import train as run_training

    _finish(run_training(cfg, Reporter(console), resume=run_dir))


def _resume_bundle(bundle, flags: dict, dry_run: bool) -> None:
    """`--resume BUNDLE`: a bundle written with --with-checkpoint, unpacked (every file checked against its manifest)
    into --output or ./runs/RUN, then resumed there."""
    import tempfile

    from infopo_cli.bundles import BundleError, check_target, read_manifest, unpack

    manifest = read_manifest(bundle)
    if not manifest.get("checkpoint"):
        raise BundleError(f"{bundle} holds no checkpoint to continue from: ask for one written with "
                          "`infopo export RUN --bundle --with-checkpoint`")
    into = Path(flags.pop("output", None) or Path("runs") / manifest["run"])
    check_target(into)
    if dry_run:  # every file checked all the same, in a folder removed afterwards
        console.print(f"would unpack {escape(str(bundle))} into {escape(str(into))} and resume it there", highlight=False)
        with tempfile.TemporaryDirectory() as scratch:
            return _resume(unpack(bundle, Path(scratch) / manifest["run"]), flags, dry_run)
    console.print(f"unpacking {escape(str(bundle))} into [bold]{escape(str(unpack(bundle, into)))}[/] "
                  f"(every file matches its manifest)", highlight=False)
    return _resume(into, flags, dry_run)


def _launch_if_asked(nproc: int, cwd: Path | None = None) -> None:
    """--nproc N (or a run saved with it) outside torchrun/accelerate: run this command as N processes (from `cwd`)."""
    from infopo_cli.train import launch

    if nproc > 1 and not launch.under_launcher():
        if cwd is not None:
            os.chdir(cwd)
        raise typer.Exit(launch.launch(nproc, launch.without_nproc(sys.argv[1:])))


def _finish(summary) -> None:
    """The summary table, then why the run stopped (if it did) and the exit code that says so (rank 0 tells)."""
    if _rank():
        raise typer.Exit(summary.exit_code)
    _print_summary(summary)
    if summary.exit_code:
        style = "red" if summary.exit_code < 128 else "yellow"
        err_console.print(f"[{style}]{'error: ' if summary.exit_code < 128 else ''}{escape(summary.message)}[/]",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(summary.exit_code)


def _print_summary(summary) -> None:
    from rich.table import Table

    table = Table(title=f"infopo run: {summary.status}, {summary.steps} steps in {summary.seconds:.0f}s", show_lines=False)
    table.add_column("metric")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    number = lambda value: "n/a" if value is None else f"{value:.4f}"  # noqa: E731  (None: a non-finite value)
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies"):
        if key in summary.first_step:
            table.add_row(f"train {key}", number(summary.first_step[key]), number(summary.last_step[key]))
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/accuracies", "logps/accuracies"):
        k = f"eval/{key}"
        if k in summary.eval_before and k in summary.eval_after:
            table.add_row(k, number(summary.eval_before[k]), number(summary.eval_after[k]))
    console.print(table)
    console.print(f"{summary.tokens_per_s:.0f} tokens/s, peak memory {summary.peak_memory_gib:.2f} GiB "
                  f"({summary.device}, {summary.dtype})", highlight=False)
    console.print(f"adapter, tokenizer, config.toml, metrics.jsonl, summary.json, plot.png, report.md, README.md (model card) -> [bold]{escape(summary.output)}[/]")


@app.command()
def losses() -> None:
    """List every loss with what it does, its paper and its defaults."""
    from rich.table import Table

    from infopo_cli.losses.registry import LOSSES, PRIORS

    table = Table("loss", "what it does", "paper", "defaults", "reference pass")
    for spec in LOSSES.values():
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        table.add_row(spec.name, spec.summary, spec.paper, defaults, "no" if spec.reference_free() else "yes")
    console.print(table)
    console.print("priors of [bold]mi[/] (--prior): " + "; ".join(f"{k} -> {p.recovers}" for k, p in PRIORS.items()),
                  highlight=False)
    console.print("any loss: --sft-weight W adds W x the NLL of the chosen response.", highlight=False)


@presets_app.callback()
def presets_list(ctx: typer.Context) -> None:
    """List the presets shipped with infopo."""
    if ctx.invoked_subcommand:
        return
    from rich.table import Table

    from infopo_cli import presets

    table = Table("preset", "description")
    for name, path in presets.available().items():
        table.add_row(name + (" (default)" if name == presets.DEFAULT_PRESET else ""), presets.description(path))
    console.print(table)


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(callback=named_path, help="Preset name or .toml file.")]) -> None:
    """Print one preset's settings with what each one means, as TOML (lines may be copied into a preset file)."""
    from infopo_cli.config import to_toml
    from infopo_cli.losses.registry import load_preset

    cfg = load_preset(name)
    for key, value in cfg.to_dict().items():
        # to_toml: true/false, quoted strings, lists; an unset value is a comment, as config.toml writes it.
        # soft_wrap: a line wrapped at the terminal's width would not be TOML
        line = to_toml({key: value}).rstrip("\n")
        console.print(f"[bold]{escape(line)}[/]  [dim]# {escape(help_for(key))}[/]", highlight=False, soft_wrap=True)


# GB per billion parameters = the type's bytes per weight (export/gguf.py QUANTS; a test keeps them equal).
QUANT_HELP = ("GGUF tensor type, with its file size in GB per billion parameters: f16 2.0, bf16 2.0, f32 4.0, q8_0 1.06, "
              "q5_1 0.75, q5_0 0.69, q4_1 0.62, q4_0 0.56; K-quants (llama.cpp's quantiser: pip install "
              "'infopo\\[gguf-check]') q6_k 0.76, q5_k_m 0.66, q4_k_m 0.57, q3_k_m 0.47, q2_k 0.37. "
              "--quant list: every type's size for this run's model, and which this installation can write.")


@app.command()
def export(
    run_dir: Annotated[Optional[str], typer.Argument(callback=named_path, help="A run folder written by `infopo train` (default: the newest under ./runs).", show_default=False)] = None,
    merged: Annotated[Optional[str], typer.Option("--merged", callback=default_or_path, help="Write merged safetensors weights to this folder (default RUN/export/merged/).", show_default=False)] = None,
    gguf: Annotated[Optional[str], typer.Option("--gguf", callback=default_or_path, help="Write a GGUF file and FILE.Modelfile for Ollama (default RUN/export/RUN-QUANT.gguf).", show_default=False)] = None,
    gguf_adapter: Annotated[Optional[str], typer.Option("--gguf-adapter", callback=default_or_path, help="Write the LoRA alone as a llama.cpp adapter GGUF (llama-cli --lora, Ollama ADAPTER; default RUN/export/RUN-adapter-QUANT.gguf), with a Modelfile on --base-gguf.", show_default=False)] = None,
    base_gguf: Annotated[Optional[str], typer.Option("--base-gguf", callback=named_path, help="The base model's GGUF for --gguf-adapter's Modelfile and check (default: the GGUF the run's base came from, if any).", show_default=False)] = None,
    bundle: Annotated[Optional[str], typer.Option("--bundle", callback=default_or_path, help="Pack the run to share as one .tar, .tar.gz or .zip with a manifest of hashes (default RUN/export/RUN.tar); `infopo generate BUNDLE` and `infopo train --resume BUNDLE` read it.", show_default=False)] = None,
    with_checkpoint: Annotated[bool, typer.Option("--with-checkpoint", help="--bundle: include the latest checkpoint, so `train --resume BUNDLE` continues the run.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Merged weights dtype: bf16, fp16, fp32.")] = "fp32",
    quant: Annotated[str, typer.Option("--quant", help=QUANT_HELP)] = "f16",
    base: Annotated[Optional[str], typer.Option("--base", callback=named_path, help="Base model (folder or hub id) instead of a run folder.")] = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", callback=named_path, help="peft adapter folder, with --base.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Reload the GGUF and compare greedy answers with the merged model.")] = True,
) -> None:
    """Merge the adapter into the full-precision base (--merged) or write a GGUF for llama.cpp / Ollama (--gguf).

    [dim]infopo export --gguf   (right after `infopo train`: the newest run, written to RUN/export/)[/]
    [dim]infopo export runs/my-run --gguf my-model.gguf --quant q8_0 && ollama create my-model -f my-model.Modelfile[/]
    """
    from infopo_cli.errors import ConfigError, ExportCheckFailed
    from infopo_cli.export.target import resolve

    if quant == "list":
        _quant_list(run_dir, base)
        return
    target = resolve(run_dir, merged, gguf, quant, base, adapter, gguf_adapter, bundle)
    if with_checkpoint and target.kind != "bundle":
        raise ConfigError("--with-checkpoint goes with --bundle")
    if base_gguf is not None and target.kind != "adapter":
        raise ConfigError("--base-gguf goes with --gguf-adapter (a merged GGUF holds its own base)")
    if target.newest is not None:
        console.print(f"exporting the newest run: [bold]{escape(str(target.newest))}[/]", highlight=False)
    if target.kind == "merged":
        from infopo_cli.export.merged import export_merged

        out = export_merged(target.source, target.out, dtype, overwrite)
        console.print(f"merged model -> [bold]{escape(str(out))}[/] (AutoModelForCausalLM.from_pretrained)")
        return
    if target.kind == "adapter":
        _export_adapter(target, quant, base_gguf, overwrite, check)
        return
    if target.kind == "bundle":
        from infopo_cli.export.bundle import export_bundle

        manifest = export_bundle(target.source.adapter, target.out, with_checkpoint, overwrite)
        size = sum(entry["bytes"] for entry in manifest["files"].values())
        console.print(f"bundle of {len(manifest['files'])} files ({size / 2**20:,.1f} MiB"
                      + (f", with {manifest['checkpoint']}" if manifest["checkpoint"] else "") + f") -> [bold]"
                      f"{escape(str(target.out))}[/]\n  use it:      infopo generate {escape(quote(str(target.out)))} --prompt '...'"
                      + (f"\n  continue it: infopo train --resume {escape(quote(str(target.out)))}" if manifest["checkpoint"] else ""),
                      highlight=False)
        return
    from infopo_cli.export.export_gguf import export_gguf

    path, modelfile, result = export_gguf(target.source, target.out, quant, overwrite, check)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.stem.lower())
    console.print(f"GGUF ({escape(quant)}) -> [bold]{escape(str(path))}[/]\n"
                  f"  Ollama:    ollama create {name} -f {escape(quote(str(modelfile)))} && ollama run {name}\n"
                  f"  llama.cpp: llama-cli -m {escape(quote(str(path)))} -cnv", highlight=False)
    if result is not None:
        for line in result.lines():
            console.print(line, highlight=False, markup=False)
        if not result.ok:
            raise ExportCheckFailed(f"check failed: {'; '.join(result.problems())}; {path} is kept for inspection")


def _export_adapter(target, quant: str, base_gguf: str | None, overwrite: bool, check: bool) -> None:
    """`infopo export --gguf-adapter`: the adapter GGUF, its Modelfile on the base GGUF, the llama.cpp check."""

    from infopo_cli.errors import ExportCheckFailed
    from infopo_cli.export.export_adapter import export_adapter

    path, modelfile, result = export_adapter(target.source, target.out, quant, Path(base_gguf) if base_gguf else None,
                                             overwrite, check, log=lambda line: console.print(escape(line), highlight=False))
    console.print(f"LoRA adapter GGUF ({escape(quant)}) -> [bold]{escape(str(path))}[/]", highlight=False)
    if modelfile is None:
        console.print("  no base GGUF known for this run: pass --base-gguf BASE.gguf for an Ollama Modelfile and the "
                      "llama.cpp check (llama-cli -m BASE.gguf --lora ADAPTER.gguf)", highlight=False)
        return
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.stem.lower())
    base = modelfile.read_text(encoding="utf-8").splitlines()[0].removeprefix("FROM ").strip('"')
    console.print(f"  Ollama:    ollama create {name} -f {escape(quote(str(modelfile)))} && ollama run {name}\n"
                  f"  llama.cpp: llama-cli -m {escape(quote(base))} --lora {escape(quote(str(path)))} -cnv",
                  highlight=False)
    if result is None:
        if check:
            console.print("  llama.cpp check skipped: pip install 'infopo[gguf-check]'", highlight=False)
        return
    for line in result.lines():
        console.print(line, highlight=False, markup=False)
    if not result.ok:
        raise ExportCheckFailed(f"check failed: {'; '.join(result.problems())}; {path} is kept for inspection")


def _quant_list(run_dir: str | None, base: str | None) -> None:
    """`infopo export [RUN] --quant list`: the GGUF types with their sizes for the run's (or --base's) model."""
    from rich.table import Table

    from infopo_cli.export.gguf import size_table
    from infopo_cli.export.target import base_model

    model = base_model(run_dir, base)
    table = Table(title=f"GGUF types for {model}")
    for column in ("--quant", "written by", "this installation", "expected size"):
        table.add_column(column, justify="right" if column == "expected size" else "left")
    for name, writer, available, size in size_table(model):
        table.add_row(name, writer, "yes" if available else "pip install 'infopo[gguf-check]'", f"{size / 2**20:,.0f} MiB")
    console.print(table)
    if base is None:  # a run's adapter alone, beside the base GGUF the user already has
        from pathlib import Path

        from infopo_cli.export.adapter_gguf import adapter_file_bytes
        from infopo_cli.reporting.runs import newest_run

        run = Path(run_dir) if run_dir else newest_run()
        if (run / "adapter_model.safetensors").is_file():
            sizes = ", ".join(f"{quant} {adapter_file_bytes(run, quant) / 2**20:,.1f} MiB" for quant in ("f16", "f32"))
            console.print(f"--gguf-adapter (the LoRA alone, on a base GGUF): {sizes}", highlight=False)


ASK_TARGET_HELP = ("A run folder (default: the newest under ./runs), an adapter folder with --base, a merged export or "
                   "model folder, or a .gguf file (llama.cpp).")


def _note(message: str) -> None:
    err_console.print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)


# sampling options shared by eval, generate and chat
Temperature = Annotated[float, typer.Option("--temperature", help="0: greedy; more: sample.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling (1: off).")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample from the K likeliest tokens (0: off).")]
SamplingSeed = Annotated[int, typer.Option("--seed", help="Seed for sampling.")]


def _sampling(max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int = 0):
    from infopo_cli.config import SEED_MAX
    from infopo_cli.errors import ConfigError
    from infopo_cli.inference.generation import Sampling

    if not 0 <= seed <= SEED_MAX:  # torch's range; outside it sampling would fail only after the model loaded
        raise ConfigError(f"--seed must be from 0 to {SEED_MAX} (got {seed})")
    return Sampling(max_new_tokens, temperature, top_p, top_k, seed).check()


@app.command("eval")
def eval_run(
    run_dir: Annotated[Optional[str], typer.Argument(callback=named_path, help="A run folder (default: the newest under ./runs), an adapter folder with --base, or a merged export / model folder.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", callback=named_path, help="Held-out data (default: the run's eval_data): preference pairs, or rows with only a prompt (and an answer) for --generate; e.g. bundled:arith_eval.", metavar="SOURCE", show_default=False)] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Also let the base and the tuned model answer every prompt, side by side. " + ANSWER_RULE
                                        + " A pair without an 'answer' whose chosen reply ends 'The answer is N.' (the bundled data) is scored against N.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply in tokens.")] = 256,
    temperature: Temperature = 0.0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Pairs per batch (default: the run's eval_batch_size) and prompts per generation batch (default 16).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Generate for the first N rows only.", show_default=False)] = None,
    out: Annotated[Optional[str], typer.Option("--out", callback=named_path, help="Summary JSON (default RUN/eval/eval.json); the replies go beside it as .jsonl and .md.", metavar="FILE.json", show_default=False)] = None,
    base: Annotated[Optional[str], typer.Option("--base", callback=named_path, help="Base model of an adapter folder; for a merged export, the model to compare with (a second model).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files (--out and the .jsonl/.md beside it).")] = False,
) -> None:
    """See what training did: held-out preference metrics of the tuned model against its base (the adapter disabled),
    and with --generate both models' answers.

    [dim]infopo eval --generate   (the newest run, on its own held-out pairs)[/]
    [dim]infopo eval runs/my-run --data questions.jsonl --generate --out results.json[/]
    """
    from infopo_cli.inference.models import find_target

    target = find_target(run_dir, base, log=_note)  # torch-free: a wrong path is one line at once
    from infopo_cli.inference.display import print_eval
    from infopo_cli.workflows.evaluation import EvalRequest, evaluate

    request = EvalRequest(str(target.path), data, generate, _sampling(max_new_tokens, temperature), batch_size, out,
                          base, limit, overwrite)
    print_eval(console, evaluate(request, log=_note))


def _ask(target, base_model: bool, compare: bool):
    """(a GgufModel, None) or (None, LoadedModel) for a `find_target` answer, checked for --base-model / --compare."""
    from infopo_cli.errors import ConfigError
    from infopo_cli.inference.models import load_target

    if target.kind == "gguf":
        if base_model or compare:
            raise ConfigError(f"{target.path}: a GGUF file holds one model, with no base to compare with; "
                              "--base-model and --compare need the run folder")
        from infopo_cli.inference.gguf_model import GgufModel

        return GgufModel(target.path), None
    loaded = load_target(target, log=_note)
    for note in loaded.notes:
        _note(note)
    if (base_model or compare) and not loaded.can_compare:
        raise ConfigError(loaded.no_base_reason())
    return None, loaded


@app.command()
def generate(
    run_dir: Annotated[Optional[str], typer.Argument(callback=named_path, help=ASK_TARGET_HELP, show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The user message (required).", show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System message.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply in tokens.")] = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: SamplingSeed = 0,
    base: Annotated[Optional[str], typer.Option("--base", callback=named_path, help="Base model of an adapter folder (or, for a merged export, the model to compare with).", show_default=False)] = None,
    base_model: Annotated[bool, typer.Option("--base-model", help="Answer with the base (the adapter disabled) instead of the tuned model.")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Print the base's and the tuned model's replies side by side.")] = False,
) -> None:
    """One reply to --prompt from the tuned model (or the base, or both).

    [dim]infopo generate --prompt "What is 12 + 30?" --compare[/]
    """
    from contextlib import nullcontext

    from infopo_cli.errors import ConfigError

    from infopo_cli.inference.models import find_target

    if not prompt:
        raise ConfigError("--prompt TEXT is required")
    if base_model and compare:
        raise ConfigError("--base-model and --compare: --compare prints the base's reply beside the tuned model's; "
                          "give one of them")
    check_text("--prompt", prompt)
    check_text("--system", system)
    target = find_target(run_dir, base, log=_note)  # torch-free: a wrong path is one line at once
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, seed)
    from infopo_cli.inference.generation import as_messages, generate as replies_to

    messages = as_messages(prompt, system)
    gguf, loaded = _ask(target, base_model, compare)
    _budget(gguf, loaded, max_new_tokens)
    if gguf is not None:
        reply = gguf.reply(messages, sampling)
    elif compare:
        from infopo_cli.inference.display import print_compare

        tuned = replies_to(loaded.model, loaded.tokenizer, [messages], sampling)[0]
        with loaded.base() as model:
            before = replies_to(model, loaded.tokenizer, [messages], sampling)[0]
        print_compare(console, loaded.base_label, before.text, tuned.text)
        return
    else:
        with loaded.base() if base_model else nullcontext(loaded.model) as model:
            reply = replies_to(model, loaded.tokenizer, [messages], sampling)[0]
    sys.stdout.write(reply.text + "\n")
    if not reply.stopped:
        _note(f"(cut at --max-new-tokens {max_new_tokens})" if reply.new_tokens >= max_new_tokens else
              "(cut at the end of the model's context)")


def _budget(gguf, loaded, max_new_tokens: int) -> None:
    """Say so when --max-new-tokens is past the model's context (replies end at the context's end)."""
    from infopo_cli.inference.generation import budget_note, context_of

    context = gguf.context if gguf is not None else context_of(loaded.model)
    if note := budget_note(context, max_new_tokens):
        _note(note)


@app.command()
def chat(
    run_dir: Annotated[Optional[str], typer.Argument(callback=named_path, help=ASK_TARGET_HELP, show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System message.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply in tokens.")] = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: SamplingSeed = 0,
    base: Annotated[Optional[str], typer.Option("--base", callback=named_path, help="Base model of an adapter folder.", show_default=False)] = None,
    base_model: Annotated[bool, typer.Option("--base-model", help="Chat with the base (the adapter disabled) instead.")] = False,
) -> None:
    """Chat with the tuned model: one line per turn, replies streamed; /reset clears the conversation, /exit ends it.

    Ctrl-C stops a reply (not the session); Ctrl-C at the prompt or Ctrl-D ends the session.
    """
    from infopo_cli.inference.models import find_target

    check_text("--system", system)
    target = find_target(run_dir, base, log=_note)  # torch-free: a wrong path is one line at once
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, seed)
    from infopo_cli.inference.chat import HELP, ChatSession, run_chat
    from infopo_cli.inference.generation import stream

    gguf, loaded = _ask(target, base_model, False)
    _budget(gguf, loaded, max_new_tokens)

    def reply(messages):
        if gguf is not None:
            yield from gguf.stream(messages, sampling)
        elif base_model:
            with loaded.base() as model:
                yield from stream(model, loaded.tokenizer, messages, sampling)
        else:
            yield from stream(loaded.model, loaded.tokenizer, messages, sampling)

    interactive = sys.stdin.isatty()
    if interactive:
        _note(f"chatting with {gguf.name if gguf else loaded.name}{' (base)' if base_model else ''}: {HELP}")

    def read_line() -> str | None:
        if not interactive:  # bytes, decoded a line at a time: a line that is not UTF-8 spoils no other line
            stdin = getattr(sys.stdin, "buffer", None)
            encoding = getattr(sys.stdin, "encoding", None) or "utf-8"  # the locale's, as a text stdin would read it
            line = stdin.readline().decode(encoding, "surrogateescape") if stdin is not None else sys.stdin.readline()
            return line or None
        try:
            return console.input("[bold]you>[/] ")
        except EOFError:
            return None

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    run_chat(ChatSession(system), reply, read_line, write, _note)


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(callback=named_path, help="Run folders written by `infopo train`.", metavar="RUN_DIR", show_default=False)],
    out: Annotated[Optional[str], typer.Option("--out", "-o", callback=named_path, help="The figure, a .png file (default: RUN/report.png for one run, ./report.png for several).", show_default=False)] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as Markdown, to paste (the figure's path goes to stderr).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing figure.")] = False,
) -> None:
    """Compare runs: their curves overlaid in one figure, and a table of their settings and held-out figures before/after.

    [dim]infopo report runs/dpo runs/infopo --markdown[/]
    """

    from infopo_cli.errors import ConfigError
    from infopo_cli.reporting import figure, table
    from infopo_cli.reporting.model_card import displacement_message
    from infopo_cli.reporting.runs import read_runs

    from infopo_cli import files

    if out and Path(out).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--out {out}: name the figure FILE.png")
    seen: set[Path] = set()
    for path in runs:
        if Path(path).resolve() in seen:
            raise ConfigError(f"{path} is given twice; name each run once")
        seen.add(Path(path).resolve())
    loaded = read_runs(runs)
    target = Path(out) if out else Path("report.png") if len(loaded) > 1 else loaded[0].path / "report.png"
    files.claim_target(target, overwrite)
    if markdown:
        sys.stdout.write(table.markdown_table(loaded))
    else:
        console.print(*table.rich_tables(loaded))
    notes = err_console if markdown else console  # stdout stays the table alone, to paste
    for setting, what in (("model", "base models"), ("data", "training data")):
        if len(given := {str(run.settings.get(setting)) for run in loaded}) > 1:
            notes.print(f"[yellow]note: these runs trained on different {what} ({escape(', '.join(sorted(given)))}): their "
                        "figures are not of one model on one task[/]", highlight=False, soft_wrap=True)
    for run in loaded:
        if message := displacement_message(run):
            notes.print(f"[yellow]{escape(run.name)}: {escape(message)}[/]", highlight=False, soft_wrap=True)
    if figure.plot_runs(loaded, target):
        notes.print(f"figure -> [bold]{escape(str(target))}[/]", highlight=False)
    else:
        notes.print("figure skipped: matplotlib is not installed (pip install 'infopo\\[plot]')", highlight=False)


# the train settings a comparison passes to every run; --loss and --output are its own
COMPARE_SETTINGS = tuple(name for name in CLI_SETTINGS if name not in OWN_FLAGS
                         and name not in ("nproc", "fsdp"))  # its runs train one after another in this process


@app.command()
@settings_options(COMPARE_SETTINGS)
def compare(
    loss: Annotated[str, typer.Option("--loss", help="The losses to train, a comma list (see `infopo losses`).")] = "infopo,dpo",
    sweep: Annotated[Optional[list[str]], typer.Option("--sweep", help="Also sweep one setting: SETTING=V1,V2 (e.g. beta=0.1,0.3): one run per loss and value.", metavar="SETTING=V1,V2", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", callback=named_path, help="Parent folder of the runs (default runs/compare-LOSSES-TIME); the same command with it continues a stopped comparison.", show_default=False)] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Then `infopo eval --generate` every run: one table of base and tuned answers.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply with --generate.")] = 256,
    preset: Preset = None,
    dry_run: DryRun = False,
    debug: Debug = False,
    *,
    settings: dict[str, Any],
) -> None:
    """Train the same data, model and seed once per loss (or swept value), each run in its own folder, then one report.

    Every other flag is an `infopo train` flag and applies to every run.
    [dim]infopo compare --loss infopo,dpo,simpo --max-steps 40 --eval-every 10 --output runs/cmp[/]
    [dim]infopo compare --loss infopo --sweep beta=0.1,0.25,0.5 --generate[/]
    """

    from infopo_cli import presets
    from infopo_cli.errors import ConfigError
    from infopo_cli.train import compare as comparison

    if sweep and len(sweep) > 1:  # a list only to see a repeat: typer would keep the last one silently
        raise ConfigError(f"--sweep given {len(sweep)} times: give one --sweep (a comparison sweeps one setting)")
    planned = comparison.prepare(loss, sweep[0] if sweep else None, output, settings, preset or presets.DEFAULT_PRESET)
    if generate:  # checked now, not after every run has trained
        sampling = _sampling(max_new_tokens, 0.0)
        if not planned.configs[0].eval_data:
            raise ConfigError("--generate scores answers to the held-out prompts, and these runs hold none out: give "
                              "--eval-data FILE")
    if len({cfg.loss for cfg in planned.configs}) > 1:  # one loss over a sweep meets the data as its first run does
        comparison.check_data(planned.configs)
    resuming = planned.check() if dry_run else planned.claim()
    head = (f"[bold]infopo compare[/]: {len(planned.variants)} runs under {escape(str(planned.parent))}"
            + (" (continuing)" if resuming else ""))
    if dry_run:  # the runs share data, model and output parent: read the data once
        console.print(head + ": " + ", ".join(escape(v.name) for v in planned.variants), highlight=False)
        return _dry_run(planned.configs[0], Path(planned.configs[0].output) if resuming else None)
    console.print(head + "; they share the reference cache (--reference precompute): the first run that needs the "
                  "reference computes it, the others read it", highlight=False)

    from infopo_cli.train.progress import Reporter
    from infopo_cli.train.recipe import train as run_training

    folders, stopped = comparison.run_all(planned.variants, planned.configs, planned.parent,
                                          lambda cfg, resume=None: run_training(cfg, Reporter(console), resume=resume),
                                          lambda line: console.print(f"[bold]{escape(line)}[/]", highlight=False))
    if stopped is not None:
        _print_summary(stopped)
        err_console.print(f"[yellow]{escape(stopped.message)}[/]\n[yellow]continue the comparison with the same "
                          f"command and --output {escape(str(planned.parent))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(stopped.exit_code)

    from infopo_cli.reporting import table

    runs, written = comparison.report(planned.parent, folders)
    console.print(*table.rich_tables(runs))
    if generate:
        from infopo_cli.workflows.evaluation import EvalRequest, evaluate

        answers, path = comparison.evaluate_all(planned.parent, folders, lambda folder: evaluate(  # overwrite: the
            EvalRequest(str(folder), generate=True, sampling=sampling, overwrite=True), log=_note))  # comparison's own
        console.print(answers, highlight=False, markup=False)
        written.append(path)
    console.print("report -> " + ", ".join(escape(str(p)) for p in written), highlight=False)


@data_app.command("check")
@settings_options(("model", "data_format", "pairs", "min_score_gap", "min_score_ratio", "prompt_field", "chosen_field",
                   "rejected_field", "completion_field", "label_field", "system_field", "split", "system_prompt", "skip_invalid",
                   "max_length"),
                  {"skip_invalid": {"help": "Go on past invalid rows: count them and show the first five, instead of stopping "
                                           "at the first.", "panel": None}})
def data_check(
    paths: Annotated[list[str], typer.Argument(callback=named_path, help="A .jsonl/.json/.csv/.parquet file, a save_to_disk folder or a hub dataset; several (SOURCE:0.3 for a share) are checked one by one, then mixed as `train --data` would.", metavar="SOURCE...", show_default=False)],
    preset: Annotated[str, typer.Option("--preset", "-p", callback=named_path, help="Preset whose tokenizer and max length to use.")] = "smollm2-135m",
    no_tokenizer: Annotated[bool, typer.Option("--no-tokenizer", help="Only validate; skip token statistics (no model files needed).")] = False,
    *,
    settings: dict[str, Any],
) -> None:
    """Validate a preference dataset, name its format and show token lengths, truncation, duplicates and padding."""
    from infopo_cli.config import merge
    from infopo_cli.data.check import check
    from infopo_cli.losses.registry import load_preset

    cfg = merge(load_preset(preset), settings, source="command line")
    tokenizer = None
    if not no_tokenizer:
        from infopo_cli.model.stack import load_tokenizer, resolve_source

        from infopo_cli.errors import ModelError

        try:
            tokenizer = load_tokenizer(resolve_source(cfg.model, log=lambda m: err_console.print(m, highlight=False)))
        except ModelError as err:  # the model is not here: the rows can still be checked
            raise ModelError(f"{err} (or check the rows alone with --no-tokenizer)") from None
    from infopo_cli.data.loading import DataOptions
    from infopo_cli.data.mixing import mix_counts, parse_source, split_note
    from infopo_cli.errors import ConfigError

    sources = [parse_source(text) for text in paths]
    reports = [check(source.spec, DataOptions.from_config(cfg), tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.batch_size)
               for source in sources]
    for report in reports:
        _print_report(report, cfg.model)
    if note := split_note([source.spec for source in sources], cfg.split):
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
    if len(sources) > 1:
        counts = mix_counts([r.pairs for r in reports], [s.weight for s in sources])
        console.print("mix (as `infopo train` would take it, seeded): " + "; ".join(
            f"{escape(s.spec)} {n} of {r.pairs} pairs ({n / sum(counts):.0%})" for s, r, n in zip(sources, reports, counts)),
            highlight=False)
        from infopo_cli.data.overlap import identity, repeated_source_notes, shared_pair_notes

        distinct: dict = {}  # a source given twice is compared once (repeated_source_notes says it is twice)
        for source, report in zip(sources, reports):
            distinct.setdefault(identity(source.spec), (source.spec, report.valid))
        for note in repeated_source_notes([s.spec for s in sources], [r.pairs for r in reports], counts) + \
                shared_pair_notes(list(distinct.values())):
            console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
        if len({r.unpaired for r in reports}) > 1:  # refused as `infopo train` refuses it
            kinds = ", ".join(f"{s.spec}: {'unpaired rows' if r.unpaired else 'pairs'}" for s, r in zip(sources, reports))
            raise ConfigError(f"these sources mix preference pairs and unpaired feedback rows ({kinds}): train on one "
                              "kind (--unpair splits each pair into two unpaired rows)")
    if any(report.skipped for report in reports):
        raise typer.Exit(1)


def _print_report(report, model: str) -> None:
    from rich.table import Table

    console.print(f"[bold]{escape(report.source)}[/]: {report.format} format, {report.pairs} valid {report.unit} of {report.rows} rows, "
                  f"{report.duplicates} duplicate {report.unit}", highlight=False)
    if report.unpaired:
        console.print(report.balance, highlight=False)
    for line in report.info:
        console.print(escape(line), highlight=False)
    for note in report.notes:
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
    if report.lengths:
        table = Table(title=f"tokens ({model})")
        for column in ("", "min", "p50", "p90", "p99", "max", "mean"):
            table.add_column(column, justify="right")
        for name in report.lengths:  # prompt, chosen, rejected; prompt, completion for unpaired rows
            stats = report.percentiles(name)
            table.add_row(name, *(f"{stats[k]:.0f}" for k in ("min", "p50", "p90", "p99", "max", "mean")))
        console.print(table)
        console.print(f"max_length auto would be {report.auto_length} (keeps 99% of the {report.unit} whole)", highlight=False)
        console.print(f"{report.truncated} {report.unit} longer than max_length {report.max_length} (would be truncated); "
                      f"padding {report.padding_grouped:.1%} with length-grouped batches "
                      f"({report.padding_random:.1%} if batched at random)", highlight=False)
    if report.skipped:
        err_console.print(f"[red]{len(report.skipped)} invalid rows[/]; first ones:", highlight=False)
        for line in report.skipped[:5]:
            err_console.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)


@app.command()
@settings_options(("model", "max_length", "batch_size", "gradient_checkpointing", "gpu_mem_margin", "share_prompt", "lora_r",
                   "target_modules", "dtype", "load_in_4bit"),
                  {"max_length": {"help": "Longest prompt+response in tokens (default: the preset's).", "panel": None,
                                  "type": int, "metavar": None}})
def plan(
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", callback=named_path, help="Preset name or .toml file (default smollm2-135m).", show_default=False)] = None,
    prompt_length: Annotated[Optional[int], typer.Option("--prompt-length", help="Prompt tokens per pair (default: the preset's max_prompt_length); with a shared prompt a shorter prompt leaves longer responses, so longer rows.", show_default=False)] = None,
    gpu_mem: Annotated[float, typer.Option("--gpu-mem", help="The GPU's memory in GiB.")] = 24.0,
    fsdp: Annotated[int, typer.Option("--fsdp", help="GPUs the base is sharded over (infopo train --fsdp --nproc N): plan one card of them; 1: one GPU, no sharding.")] = 1,
    *,
    settings: dict[str, Any],
) -> None:
    """Predict a training run's peak GPU memory from the model's config alone (no GPU, nothing downloaded): the parts,
    whether it fits, the largest batch and longest length that do, and what to change.

    [dim]infopo plan --preset llama3-8b-qlora --max-length 2048 --gpu-mem 24[/]
    """
    from infopo_cli import presets
    from infopo_cli.config import merge
    from infopo_cli.reporting.memory_table import print_plan
    from infopo_cli.losses.registry import load_preset

    cfg = merge(load_preset(preset or presets.DEFAULT_PRESET), settings, source="command line")
    cfg.validate()
    if prompt_length is not None:  # the bounds `infopo train` holds max_prompt_length to (out of them the plan clamps)
        from infopo_cli.errors import ConfigError

        if prompt_length <= 0:
            raise ConfigError(f"--prompt-length must be > 0 (got {prompt_length})")
        if isinstance(cfg.max_length, int) and prompt_length >= cfg.max_length:
            raise ConfigError(f"--prompt-length ({prompt_length}) must be < max_length ({cfg.max_length})")
    print_plan(console, cfg, prompt_length, gpu_mem, fsdp=fsdp, preset=preset or presets.DEFAULT_PRESET)


@app.command()
def doctor(
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", callback=named_path, help="Preset whose run to plan (default smollm2-135m).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """Check this machine before training: GPU, bf16, memory, kernels, library versions against the tested ones, what
    `infopo train` would pick here, and what is known to be slow or broken.

    [dim]infopo doctor --preset llama3-8b-qlora[/]
    """
    from infopo_cli import doctor as checks, presets
    from infopo_cli.losses.registry import load_preset

    cfg = load_preset(preset or presets.DEFAULT_PRESET)
    cfg.validate()
    checks.show(console, cfg, as_json, preset or presets.DEFAULT_PRESET)


# options whose value may be left out (then: the default path, so '' given is the default too: default_or_path)
OPTIONAL_VALUES = {"--gguf": "", "--merged": "", "--gguf-adapter": "", "--bundle": "",
                   "--gradient-checkpointing": "on"}  # (then: on, as the boolean flag it was meant)
OLD_SPELLINGS = {"--no-gradient-checkpointing": ["--gradient-checkpointing", "off"]}  # flags that took no value before


def _fill_optional_values(args: list[str]) -> list[str]:
    """`--gguf` with no value (last, or followed by another option) gets "" = the default path, a bare
    `--gradient-checkpointing` gets on (and `--no-gradient-checkpointing` is off), as in older commands. Typer has no
    optional-value options; without this `infopo export --gguf`, the design's own command, is a usage error."""
    out = []
    for i, arg in enumerate(args):
        out += OLD_SPELLINGS.get(arg, [arg])
        if arg in OPTIONAL_VALUES and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


def _usage_error(err: Exception) -> str | None:
    """The one-line message of a command-line usage error (typer vendors its own click), else None."""
    if not (hasattr(err, "format_message") and hasattr(err, "exit_code") and type(err).__module__.split(".")[0] in ("click", "typer")):
        return None
    ctx = getattr(err, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None and getattr(ctx, "command_path", "") else ""
    # a group called without its command (`infopo data`) raises one with no message, after printing its help
    return (" ".join(err.format_message().split()) or "missing a command") + where


def _rank() -> int:
    """This process's rank under torchrun/accelerate (0 alone): only rank 0 prints the run; others' errors say their rank."""
    return int(os.environ.get("RANK", "0"))


def _is_collective_failure(err: BaseException) -> bool:
    """A collective that failed because another process of the run stopped (its own error is printed by it)."""
    # rank 0 too: with sharded weights (--fsdp) it may be the one waiting in a pass when another process ends
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (
        type(err).__module__.startswith("torch.distributed") or "Connection closed by peer" in str(err))


def expandable_segments_by_default() -> None:
    """Let torch's CUDA allocator grow its segments instead of caching fixed ones, which steps of varying lengths
    fragment, unless the user configured the allocator. It reads the setting at the first CUDA allocation, so this
    runs before any command imports torch: PYTORCH_ALLOC_CONF from torch 2.9, PYTORCH_CUDA_ALLOC_CONF before (and
    still read by newer ones when the other is unset). Linux only, and not for ROCm builds: elsewhere torch warns it
    is unsupported."""
    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    if sys.platform.startswith("linux") and not any(name in os.environ for name in names) and _torch_without_hip():
        os.environ.update(dict.fromkeys(names, "expandable_segments:True"))


def _torch_without_hip() -> bool:
    """Whether torch is installed and is not a ROCm build, read off its version.py (`hip = None` unless ROCm) without
    importing it: importing torch takes seconds, and `--help` must not."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.origin is None:
            return False
        text = (Path(spec.origin).parent / "version.py").read_text()
    except (ImportError, ValueError, OSError):
        return False
    hip = re.search(r"^hip\s*(?::[^=\n]*)?=\s*(.*?)\s*$", text, re.MULTILINE)
    return hip is None or hip.group(1) == "None"


def main() -> None:
    expandable_segments_by_default()
    debug = "--debug" in sys.argv[1:]
    who = f"rank {_rank()}: " if _rank() else ""
    try:
        # returns the code of a typer.Exit instead of raising it
        code = app(args=_fill_optional_values(sys.argv[1:]), prog_name="infopo", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except InfopoError as err:
        if debug:  # the traceback, but the exit code stays the error's (2 for bad input)
            import traceback

            traceback.print_exc()
        err_console.print(f"{who}[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except StopNow as stop:  # a second Ctrl-C/SIGTERM during training: no new checkpoint, the last one is intact
        err_console.print(f"[yellow]{escape(str(stop))}[/]", highlight=False, soft_wrap=True)
        sys.exit(stop.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside the training loop (which saves a checkpoint itself)
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as err:  # usage errors are one line too; anything else is a bug to report
        message = _usage_error(err)
        if message is not None:
            err_console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)
        if debug:
            raise
        if _is_collective_failure(err):
            err_console.print(f"{who}stopped: another process of this run ended (see its message)", highlight=False)
            sys.exit(1)
        err_console.print(f"{who}[red]error:[/] {type(err).__name__}: {escape(str(err))} (run again with --debug for the "
                          "traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
