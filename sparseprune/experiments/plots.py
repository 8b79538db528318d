"""PNG plots of a compare run: accuracy vs sparsity, speedup vs sparsity, accuracy vs speedup.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global state).
One panel per model. A method family (`Method.name`: magnitude, obd, units...) has one colour and
one marker; its schedule (one-shot, iterative, ...) is the line style joining its levels, so the
legend lists families and schedules apart instead of one entry per (family, schedule). The
accuracy-vs-speedup plot also draws each model's Pareto front (no other row is both faster and
more accurate) and names the rows on it.
The x position of a row in the sparsity plots is the share of the dense model's weights its
deployed model keeps, measured (1 - sparsity: a removed unit takes its column in the next layer
along, layer removal and gates have no target), on a log axis: 10%, 5% and 1% kept are as far
apart as the differences between methods there.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from sparseprune.experiments.results import OK, Row

MARKERS = "osD^v<>pPX*hH8d"
# schedules as line styles; others cycle through the rest
LINESTYLES = {"one-shot": ":", "one-shot+ft": "-", "iterative": "--", "gradual": "-.", "at-init": (0, (1, 1)),
              "trained": (0, (5, 1)), "layer-wise+ft": (0, (3, 1, 1, 1, 1, 1))}
EXTRA_LINESTYLES = [(0, (2, 2)), (0, (4, 2, 1, 2)), (0, (6, 3))]
MIN_KEPT = 1e-3  # floor of the log axis
KEPT_LABEL = "weights kept vs dense (log; sparser to the right)"


def _series(rows: Sequence[Row], model: str) -> Dict[Tuple[str, str], List[Row]]:
    out: Dict[Tuple[str, str], List[Row]] = {}
    for r in rows:
        if r.model == model and r.status == OK and r.method != "dense":
            out.setdefault((r.method, r.schedule), []).append(r)
    return out


def _x(row: Row) -> float:
    """Share of the dense model's weights the deployed model keeps (1 - measured sparsity)."""
    return max(1.0 - float(row.sparsity or 0.0), MIN_KEPT)


def _kept_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))


def _acc(row: Row) -> float:
    return row.acc_converted if row.acc_converted is not None else row.acc_pruned


class Styles:
    """Colour + marker per method family, line style per schedule."""

    def __init__(self, rows: Sequence[Row]):
        from matplotlib import colormaps

        ok = [r for r in rows if r.status == OK and r.method != "dense"]
        self.methods = list(dict.fromkeys(r.method for r in ok))
        self.schedules = list(dict.fromkeys(r.schedule for r in ok))
        colors = colormaps["tab20"].colors
        self.family = {m: (colors[i % len(colors)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(self.methods)}
        extra = iter(EXTRA_LINESTYLES * (1 + len(self.schedules)))
        self.line = {s: LINESTYLES.get(s) or next(extra) for s in self.schedules}

    def of(self, method: str, schedule: str) -> Dict[str, object]:
        color, marker = self.family[method]
        return {"color": color, "marker": marker, "ls": self.line[schedule]}

    def legend(self, fig, extra: Sequence[Tuple[object, str]] = ()) -> None:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, marker=m, ls="none") for c, m in (self.family[x] for x in self.methods)]
        labels = list(self.methods)
        handles += [Line2D([], [], color="black", ls=self.line[s], lw=1.2) for s in self.schedules]
        labels += [f"schedule: {s}" for s in self.schedules]
        for handle, label in extra:
            handles.append(handle)
            labels.append(label)
        fig.legend(handles, labels, loc="outside right center", fontsize="small", frameon=False)


def _figure(n_rows: int, n_cols: int, height: float = 4.5, width: float = 6.5, sharex=False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_cols + 3.0, height * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False, sharex=sharex)


def pareto_front(points: Sequence[Tuple[float, float, object]]) -> List[Tuple[float, float, object]]:
    """The (x, y, tag) points no other point beats on both x and y (higher is better), by x."""
    front = []
    best_y = float("-inf")
    for x, y, tag in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y, tag))
            best_y = y
    return sorted(front, key=lambda p: p[0])


def _dense_line(ax, dense: Dict[str, Row], model: str):
    if model in dense:
        return ax.axhline(dense[model].acc_dense, color="black", ls="--", lw=1)
    return None


def plot_all(rows: Sequence[Row], out_dir: str, batch_sizes: Sequence[int], stem: str = "compare") -> List[str]:
    """Write the three PNGs into `out_dir`; returns their paths."""
    from matplotlib.lines import Line2D

    os.makedirs(out_dir, exist_ok=True)
    models = list(dict.fromkeys(r.model for r in rows))
    styles = Styles(rows)
    dense = {r.model: r for r in rows if r.method == "dense" and r.status == OK}
    small = batch_sizes[0]
    dense_handle = (Line2D([], [], color="black", ls="--", lw=1), "dense")
    paths = []

    # accuracy vs sparsity
    fig, grid = _figure(1, len(models))
    for ax, model in zip(grid[0], models):
        for (method, schedule), rs in _series(rows, model).items():
            rs = sorted(rs, key=_x)
            ax.plot([_x(r) for r in rs], [_acc(r) for r in rs], lw=1.2, ms=5, **styles.of(method, schedule))
        _dense_line(ax, dense, model)
        ax.set(title=f"{model}: test accuracy (converted model)", xlabel=KEPT_LABEL, ylabel="accuracy")
        _kept_axis(ax)
        ax.grid(alpha=0.3, which="both")
    styles.legend(fig, [dense_handle])
    paths.append(_save(fig, os.path.join(out_dir, f"{stem}_accuracy_vs_sparsity.png")))

    # speedup vs sparsity, one row of panels per timed batch size
    fig, grid = _figure(len(batch_sizes), len(models), height=4.0)
    for i, batch in enumerate(batch_sizes):
        for ax, model in zip(grid[i], models):
            for (method, schedule), rs in _series(rows, model).items():
                rs = sorted((r for r in rs if r.speedup(batch)), key=_x)
                ax.plot([_x(r) for r in rs], [r.speedup(batch) for r in rs], lw=1.2, ms=5,
                        **styles.of(method, schedule))
            ax.axhline(1.0, color="black", ls="--", lw=1)
            ax.set_yscale("log", base=2)
            _kept_axis(ax)
            ax.set(title=f"{model}: speedup over torch dense, batch {batch}", xlabel=KEPT_LABEL,
                   ylabel="dense time / our time")
            ax.grid(alpha=0.3, which="both")
    styles.legend(fig, [(dense_handle[0], "dense (torch)")])
    paths.append(_save(fig, os.path.join(out_dir, f"{stem}_speedup_vs_sparsity.png")))

    # accuracy vs speedup (batch 1): a panel per (model, schedule), the model's Pareto front in each
    schedules = styles.schedules
    fig, grid = _figure(len(models), len(schedules), height=3.6, width=3.6, sharex="row")
    front_handle = Line2D([], [], color="grey", lw=4, alpha=0.4)
    for axes, model in zip(grid, models):
        series = _series(rows, model)
        points = [(r.speedup(small), _acc(r), r) for rs in series.values() for r in rs if r.speedup(small)]
        if model in dense and dense[model].speedup(small):
            points.append((dense[model].speedup(small), dense[model].acc_converted, dense[model]))
        front = pareto_front(points)
        for ax, schedule in zip(axes, schedules):
            for (method, sched), rs in series.items():
                if sched != schedule:
                    continue
                rs = sorted((r for r in rs if r.speedup(small)), key=lambda r: r.speedup(small))
                ax.plot([r.speedup(small) for r in rs], [_acc(r) for r in rs], lw=0.8, ms=5, alpha=0.85,
                        **styles.of(method, sched))
            ax.plot([p[0] for p in front], [p[1] for p in front], color="grey", lw=4, alpha=0.4, zorder=0)
            for x, y, r in front:
                if r.schedule == schedule:
                    ax.annotate(f"{r.method} {r.target}", (x, y), textcoords="offset points", xytext=(3, -9),
                                fontsize=6)
            _dense_line(ax, dense, model)
            ax.axvline(1.0, color="grey", ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{model}, {schedule}", fontsize="medium")
            ax.set_xlabel(f"speedup vs torch dense (batch {small})", fontsize="small")
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel("accuracy (converted model)")
    styles.legend(fig, [dense_handle, (front_handle, "Pareto front (all schedules)")])
    paths.append(_save(fig, os.path.join(out_dir, f"{stem}_accuracy_vs_speedup.png")))
    return paths


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
