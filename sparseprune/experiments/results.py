"""One row per (model, method, schedule, level), and how rows are shown and written.

Every requested method gets its rows whatever happened: status "ok" with its measurements,
"unavailable" (its API is missing here) or "error" with the message. Nothing is dropped.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

OK, UNAVAILABLE, ERROR = "ok", "unavailable", "error"


@dataclass
class Row:
    model: str
    method: str
    schedule: str
    level: Optional[float]  # target sparsity, or the method's own knob
    target: str  # the level as shown: "90%", "1 layer removed", "L1 0.01"
    status: str = OK
    message: str = ""  # the error or why unavailable
    sparsity: Optional[float] = None  # 1 - nonzero weights deployed / weights of the dense model
    mask_sparsity: Optional[float] = None  # zeros among the pruned model's own Linear/Conv weights
    acc_dense: Optional[float] = None
    acc_pruned: Optional[float] = None  # the pruned model, masks in force, run by torch
    acc_converted: Optional[float] = None  # the deployed (shrunk/converted) model
    max_abs_diff: Optional[float] = None  # deployed vs pruned logits over the test set
    outputs_match: Optional[bool] = None
    deploy: str = ""  # "convert" or "shrink+convert"
    kernels: str = ""  # convert's choice per layer
    timing: Dict[str, Dict[str, float]] = field(default_factory=dict)  # by batch size, see measure
    params: Optional[int] = None  # nonzero parameters deployed
    params_dense: Optional[int] = None
    bytes_on_disk: Optional[int] = None
    bytes_dense: Optional[int] = None
    notes: str = ""
    epochs: Optional[int] = None  # epochs trained after pruning (through Job.fit): the budget, or 0
    seconds: Optional[float] = None  # wall time of this row (pruning, training, converting, timing)
    extra: Dict[str, Any] = field(default_factory=dict)

    def speedup(self, batch: int) -> Optional[float]:
        t = self.timing.get(str(batch))
        return None if t is None else t["speedup"]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def table_cells(row: Row, batch_sizes: Sequence[int]) -> List[str]:
    small, big = batch_sizes[0], batch_sizes[-1]
    t1 = row.timing.get(str(small))
    lat = "-" if t1 is None else f"{t1['dense_ms']:.3f}/{t1['ours_ms']:.3f}"

    def sx(b: int) -> str:
        s = row.speedup(b)
        return "-" if s is None else f"{s:.2f}x"

    status = row.status if row.status == OK else f"{row.status}: {_short(row.message)}"
    epochs = "-" if row.epochs is None else str(row.epochs)
    return [row.method, row.model, row.schedule, row.target, epochs, _pct(row.sparsity), _pct(row.acc_dense),
            _pct(row.acc_pruned), _pct(row.acc_converted), lat, sx(small), sx(big), _size(row.params),
            _bytes(row.bytes_on_disk), status]


def format_table(rows: Sequence[Row], batch_sizes: Sequence[int]) -> str:
    small, big = batch_sizes[0], batch_sizes[-1]
    header = ["method", "model", "schedule", "target", "epochs", "sparsity", "acc dense", "acc pruned", "acc converted",
              f"b{small} ms dense/ours", f"speedup b{small}", f"speedup b{big}", "params", "bytes on disk",
              "status"]
    body = [table_cells(r, batch_sizes) for r in rows]
    widths = [max([len(header[i])] + [len(b[i]) for b in body]) for i in range(len(header))]
    left = {0, 1, 2, 3, len(header) - 1}

    def line(cells: Sequence[str]) -> str:
        return " | ".join(c.ljust(w) if i in left else c.rjust(w)
                          for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])


CSV_FIELDS = ["model", "method", "schedule", "level", "target", "status", "message", "sparsity", "mask_sparsity",
              "acc_dense", "acc_pruned", "acc_converted", "max_abs_diff", "outputs_match", "deploy", "kernels",
              "params", "params_dense", "bytes_on_disk", "bytes_dense", "notes", "epochs", "seconds"]


def write_csv(path: str, rows: Sequence[Row], batch_sizes: Sequence[int]) -> None:
    timing_fields = []
    for b in batch_sizes:
        timing_fields += [f"b{b}_dense_ms", f"b{b}_ours_ms", f"speedup_b{b}", f"speedup_min_b{b}",
                          f"b{b}_dense_samples_per_s", f"b{b}_ours_samples_per_s"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + timing_fields)
        writer.writeheader()
        for row in rows:
            flat = {k: getattr(row, k) for k in CSV_FIELDS}
            for b in batch_sizes:
                t = row.timing.get(str(b), {})
                flat[f"b{b}_dense_ms"] = t.get("dense_ms")
                flat[f"b{b}_ours_ms"] = t.get("ours_ms")
                flat[f"speedup_b{b}"] = t.get("speedup")
                flat[f"speedup_min_b{b}"] = t.get("speedup_min")
                flat[f"b{b}_dense_samples_per_s"] = t.get("dense_samples_per_s")
                flat[f"b{b}_ours_samples_per_s"] = t.get("ours_samples_per_s")
            writer.writerow(flat)


def write_json(path: str, record: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")


def write_all(out_dir: str, stem: str, rows: Sequence[Row], record: Dict[str, Any],
              batch_sizes: Sequence[int]) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{stem}.json")
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    write_json(json_path, record)
    write_csv(csv_path, rows, batch_sizes)
    return [json_path, csv_path]


def disturbed(rows: Sequence[Row]) -> List[str]:
    """One line per timing whose median was far off its best run (measure.DISTURBED_RATIO): those
    were timed twice; the line says whether the second timing was clean."""
    from sparseprune.experiments.measure import DISTURBED_RATIO

    out = []
    for r in rows:
        for b, t in r.timing.items():
            first = t.get("retimed_after")
            still = t.get("speedup_min") and t["speedup"] < DISTURBED_RATIO * t["speedup_min"]
            if first is None and not still:
                continue
            line = f"{r.method} ({r.schedule}) {r.model} {r.target} b{b}: "
            if first is not None:
                line += f"first timing {first['speedup']:.2f}x median vs {first['speedup_min']:.2f}x best run, retimed: "
            line += f"{t['speedup']:.2f}x median, {t['speedup_min']:.2f}x best run" + (" (still disturbed)" if still else "")
            out.append(line)
    return out
