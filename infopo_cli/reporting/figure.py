"""`infopo report`'s figure: several runs' curves overlaid, one colour per run.

Each training curve is drawn raw and faint, with a light EMA over it (batches differ, so the raw curve is
noisy); held-out evaluations are markers in the run's colour. Line styles tell the series of a panel apart.
When any run scored its answers (--eval-generate-every), a panel shows their held-out accuracy.
matplotlib is the optional `infopo[plot]` extra: without it nothing is drawn and the caller says so.
"""

from __future__ import annotations

from pathlib import Path

from infopo_cli.reporting.displacement import smooth
from infopo_cli.reporting.runs import Run
from infopo_cli.reporting.plot import answer_curve, draw_answers, save_figure

SMOOTHING = 0.6  # light: the shape of a 40-step run survives
# (title, [(metric, line style, marker)]): training metrics; their held-out values are eval/<metric>.
PANELS = [
    ("training loss", [("loss", "-", "o")]),
    ("rewards: beta * log(pi / pi_ref)   (solid chosen, dashed rejected)",
     [("rewards/chosen", "-", "o"), ("rewards/rejected", "--", "v")]),
    ("reward margin (chosen - rejected)", [("rewards/margins", "-", "o")]),
    ("accuracy   (solid rewards/, dotted logps/)", [("rewards/accuracies", "-", "o"), ("logps/accuracies", ":", "s")]),
]
# Held-out log-probs against step 0: where likelihood displacement shows (the chosen answer falling).
HELD_OUT = ("held-out log-prob change from step 0   (solid chosen, dashed rejected)",
            [("eval/logps/chosen", "-", "o"), ("eval/logps/rejected", "--", "v")])
ANSWERS = "held-out answer accuracy   (greedy, exact match; step 0: before training)"


def plot_runs(runs: list[Run], path: Path, title: str = "") -> bool:
    """Draw the runs into one PNG at `path` (atomically); False, drawing nothing, without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return False
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    answers = any(answer_curve(run.records)[0] for run in runs)
    # two rows of panels, the legend in what is left of the second: 2 x 3, or 2 x 4 with the answers panel
    panels = len(PANELS) + 1 + answers
    columns = (panels + 2) // 2
    fig = plt.figure(figsize=(5 * columns, 8))
    grid = fig.add_gridspec(2, columns)
    axes = [fig.add_subplot(grid[i // columns, i % columns]) for i in range(panels)]
    for ax, (name, series) in zip(axes, PANELS):
        for i, run in enumerate(runs):
            _training(ax, run, series, colours[i % len(colours)])
        _decorate(ax, name)
    ax = axes[len(PANELS)]
    for i, run in enumerate(runs):
        _held_out(ax, run, colours[i % len(colours)])
    _decorate(ax, HELD_OUT[0])
    if answers:
        ax = axes[-1]
        for i, run in enumerate(runs):
            draw_answers(ax, run.records, colours[i % len(colours)], ls="-", lw=1.4, markersize=6,
                         markeredgecolor="black", markeredgewidth=0.5)
        ax.set_ylim(bottom=0)  # a share: its scale starts at none right
        _decorate(ax, ANSWERS)
    legend = fig.add_subplot(grid[1, panels - columns:])
    legend.axis("off")
    handles = [Line2D([], [], color=colours[i % len(colours)], lw=2, label=run.label) for i, run in enumerate(runs)]
    handles += [Line2D([], [], color="grey", lw=0.8, alpha=0.35, label="raw training values"),
                Line2D([], [], color="grey", lw=1.6, label=f"smoothed (EMA {SMOOTHING})"),
                Line2D([], [], color="grey", ls="", marker="o", label="held-out evaluation")]
    legend.legend(handles=handles, loc="center", fontsize=9, frameon=False)
    fig.suptitle(title or f"infopo report: {', '.join(run.name for run in runs)}")
    save_figure(fig, path)
    return True


def _training(ax, run: Run, series, colour: str) -> None:
    train, evals = run.train, run.evals
    for key, style, marker in series:
        steps = [r["step"] for r in train if key in r]
        values = [r[key] for r in train if key in r]  # None: a non-finite value, a gap in the curve
        if steps:
            ax.plot(steps, _nan(values), ls=style, color=colour, lw=0.8, alpha=0.3)
            ax.plot(steps, _nan(smooth(values, SMOOTHING)), ls=style, color=colour, lw=1.6)
        points = [r for r in evals if r.get(f"eval/{key}") is not None]
        if points:
            ax.plot([r["step"] for r in points], [r[f"eval/{key}"] for r in points], ls="", marker=marker,
                    color=colour, markersize=6, markeredgecolor="black", markeredgewidth=0.5)


def _held_out(ax, run: Run, colour: str) -> None:
    start = run.eval_before
    for key, style, marker in HELD_OUT[1]:
        if start.get(key) is None:
            continue
        points = [r for r in run.evals if r.get(key) is not None]
        ax.plot([r["step"] for r in points], [r[key] - start[key] for r in points], ls=style, marker=marker,
                color=colour, lw=1.4, markersize=6, markeredgecolor="black", markeredgewidth=0.5)
    ax.axhline(0.0, color="grey", lw=0.8)


def _nan(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def _decorate(ax, name: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
