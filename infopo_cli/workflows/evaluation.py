"""`infopo eval`: what training did to a run, on held-out pairs and (with --generate) in its answers.

Preference metrics are the run's own held-out metrics, computed as the recipe computes them: the same
tokenisation (`tokenize_cached` with the run's max lengths), batches (`eval_batches`, `collate`, the shared
prompt where the attention kernel takes it), loss and parameters (`Evaluator`). The reference is the base
with the adapter disabled (a run's --init-adapter where it had one), read once; its log-probs are also the
"before" of the log-prob changes:

    change (sum)        mean over pairs of  log pi_tuned(y|x) - log pi_base(y|x)
    change (per token)  the summed change over all pairs / their response tokens

With --generate the base and the tuned model answer every prompt (greedy unless --temperature), in batches;
rows with a reference answer are scored by `answers.matches`. Outputs: the summary (--out, default
RUN/eval/eval.json), every reply beside it (.jsonl) and a Markdown table (.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infopo_cli import files
from infopo_cli.bundles import RUN_FILES
from infopo_cli.config import TrainConfig
from infopo_cli.data.batching import collate, eval_batches
from infopo_cli.data.formats import PreferencePair
from infopo_cli.data.loading import DataOptions, data_kind, resolve
from infopo_cli.data.overlap import identity
from infopo_cli.data.mixing import as_list, load_mix, parse_source
from infopo_cli.data.token_cache import tokenize_cached
from infopo_cli.errors import ConfigError
from infopo_cli.inference.answers import matches
from infopo_cli.inference.display import accuracy_text, paired_text
from infopo_cli.inference.generation import Reply, Sampling, budget_note, context_of, generate
from infopo_cli.inference.models import LoadedModel, Target, find_target, load_target
from infopo_cli.inference.prompts import PromptRow, answers_by_row, is_prompt_only, read_prompt_rows, rows_from_pairs
from infopo_cli.losses import registry
from infopo_cli.reporting.intervals import mcnemar, wilson
from infopo_cli.train.evaluate import Evaluator
from infopo_cli.train.logps import batch_logps, takes_custom_masks

ANSWERS_FROM_CHOSEN = ("reference answers for {n} rows without an 'answer' field come from their chosen reply's "
                       "closing 'The answer is N.'")


@dataclass(frozen=True)
class EvalRequest:
    """What `infopo eval` was asked: the model, the data, whether to generate, and where to write."""

    target: str | None = None       # a run folder (default: the newest under ./runs), adapter folder or model folder
    data: str | None = None         # default: the run's eval_data
    generate: bool = False
    sampling: Sampling = Sampling()
    batch_size: int | None = None   # default: the run's eval_batch_size
    out: str | None = None          # default: TARGET/eval/eval.json
    base: str | None = None
    limit: int | None = None        # generate for the first N rows only
    overwrite: bool = False         # replace existing output files


@dataclass
class EvalResult:
    """What `infopo eval` found: the preference metrics, the generation scores and every reply."""

    target: Target
    data: str
    out: Path
    preference: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def replies_path(self) -> Path:
        return self.out.with_suffix(".jsonl")

    @property
    def table_path(self) -> Path:
        return self.out.with_suffix(".md")

    def summary(self) -> dict[str, Any]:
        """eval.json's content: what was evaluated, on what, the figures and the notes."""
        return {"target": str(self.target.path), "kind": self.target.kind, "base": self.target.base, "data": self.data,
                "preference": self.preference, "generation": self.generation, "notes": self.notes,
                **({"replies": str(self.replies_path), "table": str(self.table_path)} if self.rows else {})}


def evaluate(request: EvalRequest, log: Callable[[str], None] = print) -> EvalResult:
    """Everything `infopo eval` does but print; the outputs are written before it returns."""
    sampling = request.sampling.check()
    if request.batch_size is not None and request.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {request.batch_size})")
    if request.limit is not None and request.limit < 1:
        raise ConfigError(f"--limit must be at least 1 (got {request.limit})")
    target = find_target(request.target, request.base, log)
    if target.kind == "gguf":
        raise ConfigError(f"{target.path}: `infopo eval` reads the run folder or a merged export (a GGUF file is "
                          "for `infopo generate` and `infopo chat`)")
    out = Path(request.out) if request.out else target.folder / "eval" / "eval.json"
    if out.suffix != ".json":
        raise ConfigError(f"--out {out}: name a .json file (the replies go beside it as .jsonl and .md)")
    cfg = target.config or TrainConfig(model=target.base or str(target.path))
    spec = request.data or (cfg.eval_data if target.config is not None else None) or None
    if not spec:
        raise ConfigError(f"{target.path}: no held-out data to evaluate on: pass --data FILE"
                          + (" (its run had no eval_data)" if target.config is not None else ""))
    shown_spec = ", ".join(as_list(spec))
    options = DataOptions.from_config(cfg, cfg.eval_split)
    claim_outputs(out, as_list(spec), request.generate, request.overwrite)
    result_notes = trained_on_note(target.config, spec) if request.data else []

    # --- data first: a bad row costs no model load ---------------------------------------------------
    pairs: list[PreferencePair] = []
    prompt_rows: list[PromptRow] | None = None
    if isinstance(spec, str) and parse_source(spec).weight is None and is_prompt_only(spec, options.split, options.fields):
        if not request.generate:
            raise ConfigError(f"{spec} holds prompts without chosen/rejected replies: only --generate can use it")
        prompt_rows = read_prompt_rows(spec, options.split, options.fields, cfg.system_prompt)
    else:
        pairs = load_mix(spec, options, cfg.seed).pairs
    result = EvalResult(target, shown_spec, out, notes=result_notes)

    loaded = load_target(target, log)
    result.notes += loaded.notes
    if request.generate and (note := budget_note(context_of(loaded.model), request.sampling.max_new_tokens)):
        log(note)  # at once, and with the results
        result.notes.append(note)
    if pairs and target.config is None and loaded.can_compare:
        result.notes.append(f"{target.path} is not a run folder: its pairs are scored with the default loss "
                            f"({cfg.loss}) and lengths (max_length {cfg.max_length})")
    if pairs:
        log(f"preference metrics on {len(pairs)} held-out pairs")
        result.preference = preference_metrics(loaded, pairs, cfg, request.batch_size or cfg.eval_batch_size, result.notes)
    else:
        result.notes.append(f"{shown_spec} has no preference pairs: preference metrics skipped")
    if request.generate:
        rows = prompt_rows if prompt_rows is not None else rows_from_pairs(pairs, answers_by_row(spec, options.split))
        rows = rows[:request.limit] if request.limit else rows
        log(f"generating replies to {len(rows)} prompts" + (" (base and tuned)" if loaded.can_compare else ""))
        result.generation, result.rows = generation_metrics(loaded, rows, sampling, request.batch_size or 16, result.notes)
    write_outputs(result)
    return result


def trained_on_note(config: TrainConfig | None, data: str | list[str]) -> list[str]:
    """A warning when --data names a source the run trained on (its held-out figures then measure memory)."""
    if config is None:
        return []
    trained = {identity(parse_source(spec).spec) for spec in as_list(config.data)}
    same = [spec for spec in as_list(data) if identity(parse_source(spec).spec) in trained]
    return [f"{', '.join(same)}: this run trained on it, so these figures measure what the model memorised, not how "
            "it generalises"] if same else []


def output_paths(out: Path, generate: bool) -> list[Path]:
    """The files an eval writes: the summary, and with --generate the replies (.jsonl) and the table (.md) beside it."""
    return [out, out.with_suffix(".jsonl"), out.with_suffix(".md")] if generate else [out]


def claim_outputs(out: Path, data: list[str], generate: bool, overwrite: bool) -> None:
    """Before any model loads: the outputs must not exist (unless --overwrite), and never be the data being read."""
    paths = output_paths(out, generate)
    sources = {resolve(parse_source(spec).spec).resolve() for spec in data}
    for path in paths:
        if path.resolve() in sources:
            raise ConfigError(f"--out {out} would write {path}, the data this evaluation reads; choose another --out")
        if path.name in RUN_FILES and (path.parent / "config.toml").is_file():  # --overwrite or not
            raise ConfigError(f"--out {out} would write {path}, a file of the run in {path.parent}; choose another "
                              "--out (the default is the run's eval/eval.json)")
    files.claim_targets(paths, overwrite)
    files.check_writable(out, "--out")


# --- preference metrics ----------------------------------------------------------------------------

def preference_metrics(loaded: LoadedModel, pairs: list[PreferencePair], cfg: TrainConfig, batch_size: int,
                       notes: list[str]) -> dict[str, Any] | None:
    """The run's held-out metrics of the tuned model against its reference, and the log-prob changes."""
    if not loaded.can_compare:
        notes.append(f"{loaded.no_base_reason()}: preference metrics skipped")
        return None
    spec, params = registry.resolve(cfg.loss, cfg.loss_overrides())
    if data_kind(pairs) == "unpaired" or "pairs" not in spec.data:
        notes.append("preference metrics compare a chosen and a rejected reply: skipped for unpaired feedback rows "
                     "(a run's own held-out figures on them are in its metrics.jsonl)")
        return None
    needs = spec.needs(params)
    if needs.kl and not loaded.has_adapter:
        notes.append(f"loss {cfg.loss} needs the tuned model and its reference in one model (an adapter): preference "
                     "metrics skipped for a merged model")
        return None
    tokenizer = loaded.tokenizer
    limits = (10**9, 10**9) if cfg.max_length == "auto" else (cfg.max_length, cfg.max_prompt_length)
    tokenized = tokenize_cached(pairs, tokenizer, *limits, cfg.skip_invalid)
    if tokenized.skipped:
        notes.append(f"{len(tokenized.skipped)} pairs could not be tokenised and are left out (first: {tokenized.skipped[0]})")
    if not tokenized.pairs:
        notes.append("no pair could be tokenised: preference metrics skipped")
        return None
    share_prompt = cfg.share_prompt and takes_custom_masks(loaded.model)
    if loaded.reference is not None:
        share_prompt = share_prompt and takes_custom_masks(loaded.reference)
    device = loaded.device
    batches = [collate(b, tokenizer.pad_token_id, share_prompt) for b in eval_batches(tokenized.pairs, batch_size)]

    # the base's log-probs, once: the reference of every loss that has one, and the "before" of each change
    base_chosen, base_rejected, chosen_tokens, rejected_tokens = [], [], 0, 0
    with loaded.base() as base:
        for batch in batches:
            sums = batch_logps(base, batch.to(device)).sums.float().cpu()
            counts = batch.targets.counts()
            n = batch.n_pairs
            base_chosen.append(sums[:n])
            base_rejected.append(sums[n:])
            chosen_tokens += int(counts[:n].sum())
            rejected_tokens += int(counts[n:].sum())
    evaluator = Evaluator(batches, spec, params, device)
    if needs.reference:
        evaluator.reference = [torch.cat([c, r]).to(device) for c, r in zip(base_chosen, base_rejected)]
    tuned = evaluator(loaded.model)
    chosen, rejected = torch.cat(base_chosen), torch.cat(base_rejected)
    n_pairs = len(chosen)
    change_chosen = tuned["eval/logps/chosen"] - float(chosen.mean())
    change_rejected = tuned["eval/logps/rejected"] - float(rejected.mean())
    return {
        "pairs": n_pairs, "loss_name": cfg.loss, "loss_params": params, "reference": loaded.base_label,
        "loss": tuned["eval/loss"],
        "reward_accuracy": tuned["eval/rewards/accuracies"],       # reward margin > 0, the loss's own rewards
        "reward_margin": tuned["eval/rewards/margins"],
        "rewards_chosen": tuned["eval/rewards/chosen"], "rewards_rejected": tuned["eval/rewards/rejected"],
        "logp_change_chosen": change_chosen, "logp_change_rejected": change_rejected,
        "logp_change_chosen_per_token": change_chosen * n_pairs / max(chosen_tokens, 1),
        "logp_change_rejected_per_token": change_rejected * n_pairs / max(rejected_tokens, 1),
        "logps_chosen": {"base": float(chosen.mean()), "tuned": tuned["eval/logps/chosen"]},
        "logps_rejected": {"base": float(rejected.mean()), "tuned": tuned["eval/logps/rejected"]},
        # the model's own preference: the chosen reply more likely than the rejected one
        "preference_accuracy": {"base": float((chosen > rejected).float().mean()), "tuned": tuned["eval/logps/accuracies"]},
        "tokens": {"chosen": chosen_tokens, "rejected": rejected_tokens},
    }


# --- generation ------------------------------------------------------------------------------------

def _scored(replies: list[Reply], rows: list[PromptRow]) -> list[bool]:
    """Right or wrong, for each row that has a reference answer."""
    return [matches(reply.text, row.answer) for reply, row in zip(replies, rows) if row.answer is not None]


def _side(replies: list[Reply], rows: list[PromptRow]) -> dict[str, Any]:
    scored = _scored(replies, rows)
    return {"accuracy": sum(scored) / len(scored) if scored else None, "correct": sum(scored),
            "interval": list(wilson(sum(scored), len(scored))) if scored else None,  # 95%, Wilson
            "stopped": sum(r.stopped for r in replies) / len(replies),
            "mean_new_tokens": sum(r.new_tokens for r in replies) / len(replies)}


def _paired(base: list[Reply], tuned: list[Reply], rows: list[PromptRow]) -> dict[str, Any] | None:
    """Base and tuned on the same problems: how many only the tuned model gets right, how many only the base, and
    McNemar's exact p-value (the difference is called real below 0.05)."""
    if not any(row.answer is not None for row in rows):
        return None
    test = mcnemar(_scored(tuned, rows), _scored(base, rows))
    return {"tuned_only": test.only_first, "base_only": test.only_second, "p_value": test.p_value, "real": test.real}


def generation_metrics(loaded: LoadedModel, rows: list[PromptRow], sampling: Sampling, batch_size: int,
                       notes: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Base and tuned replies side by side, and their exact-match accuracy where rows have answers."""
    prompts = [row.messages for row in rows]
    tuned = generate(loaded.model, loaded.tokenizer, prompts, sampling, batch_size)
    base = None
    if loaded.can_compare:
        with loaded.base() as model:
            base = generate(model, loaded.tokenizer, prompts, sampling, batch_size)
    else:
        notes.append(f"{loaded.name} has no base inside it to compare with (pass --base BASE): tuned replies only")
    derived = sum(row.answer_from == "chosen" for row in rows)
    if derived:
        notes.append(ANSWERS_FROM_CHOSEN.format(n=derived))
    with_answer = sum(row.answer is not None for row in rows)
    summary = {"rows": len(rows), "with_answer": with_answer, "answers_from_chosen": derived,
               "sampling": dataclasses.asdict(sampling), "tuned": _side(tuned, rows),
               "base": _side(base, rows) if base is not None else None,
               "changed": sum(b.text != t.text for b, t in zip(base, tuned)) / len(rows) if base is not None else None,
               "paired": _paired(base, tuned, rows) if base is not None else None}
    records = []
    for i, row in enumerate(rows):
        record = {"where": row.where, "prompt": row.messages, "answer": row.answer, "answer_from": row.answer_from or None}
        for name, replies in (("base", base), ("tuned", tuned)):
            if replies is None:
                record[name] = None
                continue
            reply = replies[i]
            record[name] = {"text": reply.text, "new_tokens": reply.new_tokens, "stopped": reply.stopped,
                            "correct": matches(reply.text, row.answer) if row.answer is not None else None}
        records.append(record)
    return summary, records


# --- outputs ---------------------------------------------------------------------------------------

def _cell(text: Any) -> str:
    return "" if text is None else str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown(result: EvalResult) -> str:
    """The Markdown table of the replies, under the exact-match accuracies and the notes."""
    lines = [f"# infopo eval: {result.target.path}", "", f"data: {result.data}", ""]
    gen = result.generation or {}
    for name in ("base", "tuned"):
        side = gen.get(name)
        if side and side["accuracy"] is not None:
            lines.append(f"- {name} exact-match accuracy: {accuracy_text(side, gen['with_answer'])}")
    if gen.get("paired"):
        lines.append(f"- {paired_text(gen['paired'])}")
    lines += [f"- {note}" for note in result.notes] + ["", "| # | prompt | answer | base | tuned |", "|---|---|---|---|---|"]
    for i, row in enumerate(result.rows, start=1):
        def reply(side: dict | None) -> str:
            if side is None:
                return ""
            mark = {True: " ✓", False: " ✗", None: ""}[side["correct"]]
            return _cell(side["text"]) + mark
        question = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")
        lines.append(f"| {i} | {_cell(question)} | {_cell(row['answer'])} | {reply(row['base'])} | {reply(row['tuned'])} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: EvalResult) -> None:
    """Write eval.json and, when there are replies, the .jsonl and .md beside it; each file atomically. The replies of
    the evaluation it replaces (--overwrite without --generate) go with it: they would pass for this one's."""
    stale = _written_beside(result.out) if not result.rows else []
    files.write_json(result.out, result.summary())
    for path in stale:
        path.unlink(missing_ok=True)
    if result.rows:
        files.write_text(result.replies_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows))
        files.write_text(result.table_path, markdown(result))


def _written_beside(out: Path) -> list[Path]:
    """The replies and table that the eval.json at `out` says it wrote beside it (none if it is not one)."""
    try:
        earlier = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict):
        return []
    beside = {out.with_suffix(".jsonl"), out.with_suffix(".md")}
    return [Path(earlier[key]) for key in ("replies", "table")
            if isinstance(earlier.get(key), str) and Path(earlier[key]) in beside]

