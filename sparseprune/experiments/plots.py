"""PNG plots of a compare run: accuracy vs sparsity, speedup vs sparsity, accuracy vs speedup.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global state).
One panel per model; each (method, schedule) is one series, the dense model a dashed line.
The x position of a row is the share of the dense model's weights its deployed model keeps,
measured (1 - sparsity: a removed unit takes its column in the next layer along, an ensemble of
K keeps K masked copies, layer removal and gates have no target), on a log axis: 10%, 5% and 1%
kept are as far apart as the differences between methods there.
"""
from __future__ import annotations

import os
from itertools import cycle
from typing import Dict, List, Sequence, Tuple

from sparseprune.experiments.results import OK, Row

MARKERS = "osD^v<>pPX*hH"


def _series(rows: Sequence[Row], model: str) -> Dict[str, List[Row]]:
    out: Dict[str, List[Row]] = {}
    for r in rows:
        if r.model == model and r.status == OK and r.method != "dense":
            out.setdefault(f"{r.method} ({r.schedule})", []).append(r)
    return out


def _x(row: Row) -> float:
    """Share of the dense model's weights the deployed model keeps (1 - measured sparsity)."""
    return max(1.0 - float(row.sparsity or 0.0), MIN_KEPT)


MIN_KEPT = 1e-3  # floor of the log axis
KEPT_LABEL = "weights kept vs dense (log; sparser to the right)"


def _kept_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))


def _acc(row: Row) -> float:
    return row.acc_converted if row.acc_converted is not None else row.acc_pruned


def _styles(names: Sequence[str]) -> Dict[str, Tuple[object, str]]:
    from matplotlib import colormaps

    colors = colormaps["tab20"].colors
    markers = cycle(MARKERS)
    return {name: (colors[i % len(colors)], next(markers)) for i, name in enumerate(names)}


def _figure(n_panels: int, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * n_panels + 3.5, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, axes


def _save(fig, ax_list, path: str) -> str:
    handles, labels = {}, []
    for ax in ax_list:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="outside right center", fontsize="small",
                   frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_all(rows: Sequence[Row], out_dir: str, batch_sizes: Sequence[int], stem: str = "compare") -> List[str]:
    """Write the three PNGs into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    models = list(dict.fromkeys(r.model for r in rows))
    names = list(dict.fromkeys(n for m in models for n in _series(rows, m)))
    styles = _styles(names)
    dense = {r.model: r for r in rows if r.method == "dense" and r.status == OK}
    small = batch_sizes[0]
    paths = []

    # accuracy vs sparsity
    fig, axes = _figure(len(models))
    for ax, model in zip(axes, models):
        for name, rs in _series(rows, model).items():
            rs = sorted(rs, key=_x)
            color, marker = styles[name]
            ax.plot([_x(r) for r in rs], [_acc(r) for r in rs], marker=marker, color=color, label=name, lw=1.2)
        if model in dense:
            ax.axhline(dense[model].acc_dense, color="black", ls="--", lw=1, label="dense")
        ax.set(title=f"{model}: test accuracy (converted model)", xlabel=KEPT_LABEL,
               ylabel="accuracy")
        _kept_axis(ax)
        ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, axes, os.path.join(out_dir, f"{stem}_accuracy_vs_sparsity.png")))

    # speedup vs sparsity, one row of panels per timed batch size
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(models) + 3.5, 4.0 * len(batch_sizes)), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(batch_sizes), len(models), squeeze=False)
    for i, batch in enumerate(batch_sizes):
        for ax, model in zip(grid[i], models):
            for name, rs in _series(rows, model).items():
                rs = sorted((r for r in rs if r.speedup(batch)), key=_x)
                color, marker = styles[name]
                ax.plot([_x(r) for r in rs], [r.speedup(batch) for r in rs], marker=marker, color=color,
                        label=name, lw=1.2)
            ax.axhline(1.0, color="black", ls="--", lw=1, label="dense (torch)")
            ax.set_yscale("log", base=2)
            _kept_axis(ax)
            ax.set(title=f"{model}: speedup over torch dense, batch {batch}", xlabel=KEPT_LABEL,
                   ylabel="dense time / our time")
            ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, list(grid.flat), os.path.join(out_dir, f"{stem}_speedup_vs_sparsity.png")))

    # accuracy vs speedup (batch 1)
    fig, axes = _figure(len(models))
    for ax, model in zip(axes, models):
        for name, rs in _series(rows, model).items():
            rs = [r for r in rs if r.speedup(small)]
            color, marker = styles[name]
            ax.scatter([r.speedup(small) for r in rs], [_acc(r) for r in rs], marker=marker, color=color,
                       label=name, s=24)
        if model in dense:
            ax.axhline(dense[model].acc_dense, color="black", ls="--", lw=1, label="dense")
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{model}: accuracy vs speedup at batch {small}", xlabel=f"speedup over torch dense (batch {small})",
               ylabel="accuracy (converted model)")
        ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, axes, os.path.join(out_dir, f"{stem}_accuracy_vs_speedup.png")))
    return paths
