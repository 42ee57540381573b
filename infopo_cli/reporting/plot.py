"""plot.png of a run: loss, log-probs, margins and accuracies per step, evaluations as points."""

from __future__ import annotations

from pathlib import Path

from infopo_cli import files

# Rewards (beta * log-ratio to the reference) rather than raw log-probs: batches differ in length, so raw
# log-probs jump from step to step while the change against the reference is comparable.
PANELS = [("loss", ["loss"]), ("rewards: beta * log(pi / pi_ref)", ["rewards/chosen", "rewards/rejected"]),
          ("reward margin", ["rewards/margins"]),
          ("accuracy", ["rewards/accuracies", "logps/accuracies"])]
ANSWERS = "eval/answers/accuracy"  # held-out only: --eval-generate-every's greedy replies, exact match


def plot_run(records: list[dict], path: Path, title: str) -> bool:
    """Draw the curves; returns False (and draws nothing) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, keys) in zip(axes.flat, PANELS):
        for key in keys:
            steps = [r for r in train if key in r]
            colour = ax.plot([r["step"] for r in steps], [r[key] for r in steps], label=key, lw=1.2)[0].get_color() \
                if steps else None
            points = [r for r in evals if f"eval/{key}" in r]
            if points:
                ax.plot([r["step"] for r in points], [r[f"eval/{key}"] for r in points], "o--", color=colour,
                        label=f"eval/{key}")
        if name == "accuracy":
            draw_answers(ax, records, label=ANSWERS)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)
    return True


def answer_curve(records: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, accuracies) of the evaluations that scored answers; step 0 is the model before training."""
    points = [r for r in records if r.get("kind") == "eval" and r.get(ANSWERS) is not None]
    return [r["step"] for r in points], [r[ANSWERS] for r in points]


def draw_answers(ax, records: list[dict], colour: str | None = None, label: str | None = None, **style) -> bool:
    """The held-out answer accuracy as a dashed line through its evaluations (plot.png and `infopo report` share
    it); False, drawing nothing, when the run scored no answers."""
    steps, values = answer_curve(records)
    if steps:
        ax.plot(steps, values, **{"ls": "--", "marker": "o", "color": colour, "label": label, **style})
    return bool(steps)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically (a stopped run never leaves half a picture), then free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with files.replacing(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
