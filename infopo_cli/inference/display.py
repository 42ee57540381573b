"""What `infopo eval` and `infopo generate --compare` show on screen (rich tables); the files hold everything."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infopo_cli.reporting.intervals import verdict

SHOWN_ROWS = 5      # replies shown on screen; the .md/.jsonl files hold all
SHOWN_CHARS = 160


def _number(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if percent else f"{value:.4f}"


def _short(text: str) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)  # a control character must not reach the terminal
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def accuracy_text(side: dict[str, Any], with_answer: int) -> str:
    """'7.3% (11/150; 95% CI 4.1-12.7%)'."""
    low, high = side.get("interval") or (None, None)
    interval = f"; 95% CI {low:.1%}-{high:.1%}" if low is not None else ""
    return f"{side['accuracy']:.1%} ({side['correct']}/{with_answer}{interval})"


def paired_text(paired: dict[str, Any]) -> str:
    """What the paired test says, in one sentence."""
    return (f"right only after tuning: {paired['tuned_only']}, only before: {paired['base_only']} "
            f"(McNemar p = {paired['p_value']:.3g}: {verdict(paired['real'])})")


def print_eval(console: Console, result) -> None:
    """The `infopo eval` summary: the held-out pair metrics and, with --generate, answer accuracy of base and tuned."""
    pref, gen = result.preference, result.generation
    if pref:
        table = Table(title=f"held-out pairs: {pref['pairs']} ({escape(result.data)}), loss {pref['loss_name']}, "
                            f"reference = {pref['reference']}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("loss", _number(pref["loss"]))
        table.add_row("reward accuracy (margin > 0)", _number(pref["reward_accuracy"], percent=True))
        table.add_row("mean reward margin", _number(pref["reward_margin"]))
        for side in ("chosen", "rejected"):
            table.add_row(f"{side} log-prob change vs reference (sum)", f"{pref[f'logp_change_{side}']:+.4f}")
            table.add_row(f"{side} log-prob change vs reference (per token)", f"{pref[f'logp_change_{side}_per_token']:+.4f}")
        acc = pref["preference_accuracy"]
        table.add_row("own preference accuracy, base -> tuned",
                      f"{_number(acc['base'], True)} -> {_number(acc['tuned'], True)}")
        console.print(table)
    if gen:
        table = Table(title=f"generation: {gen['rows']} prompts, {gen['with_answer']} with a reference answer")
        table.add_column("")
        for name in ("base", "tuned"):
            if gen[name] is not None:
                table.add_column(name, justify="right")
        sides = [gen[name] for name in ("base", "tuned") if gen[name] is not None]
        if gen["with_answer"]:
            table.add_row("exact-match accuracy", *(f"{_number(s['accuracy'], True)} ({s['correct']}/{gen['with_answer']})"
                                                    for s in sides))
            if all(s.get("interval") for s in sides):
                table.add_row("95% interval (Wilson)", *(f"{s['interval'][0]:.1%}-{s['interval'][1]:.1%}" for s in sides))
        table.add_row("replies that stopped", *(_number(s["stopped"], True) for s in sides))
        table.add_row("mean new tokens", *(f"{s['mean_new_tokens']:.1f}" for s in sides))
        console.print(table)
        if gen["changed"] is not None:
            console.print(f"tuned replies that differ from the base's: {gen['changed']:.0%}", highlight=False)
        if gen.get("paired"):
            console.print(f"same problems, {paired_text(gen['paired'])}", highlight=False)
        print_replies(console, result.rows[:SHOWN_ROWS])
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    written = [result.out] + ([result.replies_path, result.table_path] if result.rows else [])
    console.print("summary" + (", replies, table" if result.rows else "") + " -> "
                  + ", ".join(f"[bold]{escape(str(p))}[/]" for p in written), highlight=False)


def print_replies(console: Console, rows: list[dict[str, Any]]) -> None:
    """The first replies side by side (prompt, reference answer, base, tuned), each marked right or wrong where scored.
    """
    if not rows:
        return
    table = Table(title="replies (first ones)", show_lines=True)
    for column in ("prompt", "answer", "base", "tuned"):
        table.add_column(column, overflow="fold")
    for row in rows:
        question = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")

        def cell(side: dict | None) -> str:
            if side is None:
                return "[dim]-[/]"
            mark = {True: " [green]✓[/]", False: " [red]✗[/]", None: ""}[side["correct"]]
            return escape(_short(side["text"])) + mark

        answer = "" if row["answer"] is None else str(row["answer"])
        table.add_row(escape(_short(question)), escape(answer), cell(row["base"]), cell(row["tuned"]))
    console.print(table)


def print_compare(console: Console, base_label: str, base_text: str, tuned_text: str) -> None:
    """The base's and the tuned model's replies to one prompt, side by side (`infopo generate --compare`)."""
    table = Table(show_lines=True)
    table.add_column(base_label, overflow="fold")
    table.add_column("tuned", overflow="fold")
    table.add_row(escape(base_text), escape(tuned_text))
    console.print(table)
