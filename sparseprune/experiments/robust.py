"""`sparseprune compare --robust`: the six networks of Madaan, Shin & Hwang (ICML 2020), measured
for robustness and for real CPU speed.

On the digits (pixels in [0, 1]) each model — the 64-512-512-10 MLP and a LeNet-style CNN
(conv 20 - pool - conv 50 - pool - 500 - 10, LeNet-5-Caffe's widths on 8x8 images, no BatchNorm,
so a unit's mask is not undone) — is trained from the same seeded start as:

  standard   cross-entropy;
  bp         beta-Bernoulli dropout (Bayesian pruning), clean loss + KL;
  at         PGD adversarial training (clean and adversarial loss mixed, as in the paper);
  at-vs      AT + the vulnerability suppression loss;
  anp        beta-Bernoulli masks learned on the adversarial loss + KL, weights on the AT loss;
  anp-vs     ANP + the vulnerability suppression loss.

Each result is pruned (units whose keep-probability is under the threshold are masked, the others
scaled), shrunk (`sparseprune.shrink`), converted (`sparseprune.convert`) and checked against the
pruned model on the test set, then reported: clean accuracy, white-box PGD accuracy (more steps
than training, random start), FGSM accuracy, vulnerability of each latent layer, hidden units and
parameters kept, bytes on disk, and batch-1 / batch-256 time of the deployed network against the
standard network run dense by torch at the same thread count. Rows are seeded from (seed, model,
network), so any subset reproduces the full run's rows.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from sparseprune.compare import NOISY_SPREAD
from sparseprune.data import DataSplit
from sparseprune.experiments.deploy import deploy
from sparseprune.experiments.measure import footprint, time_against_dense, torch_threads
from sparseprune.experiments.models import as_flat, as_image, build_mlp
from sparseprune.experiments.runner import load_data, row_seed, seed_everything
from sparseprune.model_copy import deepcopy_model
from sparseprune.robust import FGSM, PGD, RobustObjective, evaluate_robustness
from sparseprune.train import evaluate_accuracy, train

LENET_WIDTHS = (20, 50, 500)  # LeNet-5-Caffe's conv1, conv2, fc widths (the paper's MNIST network)


def build_lenet(image_shape: Tuple[int, int, int], n_classes: int, widths: Tuple[int, int, int] = LENET_WIDTHS):
    """conv3x3(c1)-ReLU-pool2, conv3x3(c2)-ReLU-pool2, flatten, Linear(f)-ReLU, Linear(classes)."""
    c_in, h, w = image_shape
    if min(h, w) < 4:
        raise ValueError(f"the LeNet-style CNN needs images of at least 4x4, got {h}x{w}")
    c1, c2, f = widths
    features = nn.Sequential(
        nn.Conv2d(c_in, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    with torch.no_grad():
        n_flat = features(torch.zeros(1, c_in, h, w)).shape[1]
    return nn.Sequential(*features, nn.Linear(n_flat, f), nn.ReLU(), nn.Linear(f, n_classes))


@dataclass(frozen=True)
class RobustModel:
    name: str
    description: str
    prepare: Callable[[torch.Tensor], torch.Tensor]
    build: Callable[[torch.Tensor, int], nn.Module]


ROBUST_MODELS = {
    "mlp": RobustModel("mlp", "MLP 64-512-512-10", as_flat, lambda x, n: build_mlp(x.shape[1], n)),
    "cnn": RobustModel("cnn", "LeNet-style CNN conv20-pool-conv50-pool-fc500-10", as_image,
                       lambda x, n: build_lenet(tuple(x.shape[1:]), n)),
}


@dataclass(frozen=True)
class Network:
    name: str
    adversarial: bool  # trained on PGD examples
    vs: bool  # with the vulnerability suppression loss
    masks: bool  # beta-Bernoulli masks, pruned and shrunk
    description: str


NETWORKS = {
    "standard": Network("standard", False, False, False, "cross-entropy only"),
    "bp": Network("bp", False, False, True, "beta-Bernoulli dropout (Bayesian pruning): clean loss + KL"),
    "at": Network("at", True, False, False, "PGD adversarial training"),
    "at-vs": Network("at-vs", True, True, False, "adversarial training + vulnerability suppression"),
    "anp": Network("anp", True, False, True, "adversarial neural pruning: masks on the adversarial loss + KL"),
    "anp-vs": Network("anp-vs", True, True, True, "ANP + vulnerability suppression"),
}


@dataclass(frozen=True)
class RobustConfig:
    models: Tuple[str, ...] = ("mlp", "cnn")
    networks: Tuple[str, ...] = tuple(NETWORKS)
    # L-infinity radius, pixels in [0, 1]. At 0.1 the standard MLP keeps 56% PGD accuracy (8x8
    # digits are coarse); at 0.2 it keeps 2%, AT ~50%.
    eps: float = 0.2
    train_steps: int = 5  # PGD steps while training (step 2.5 eps / steps)
    eval_steps: int = 20  # white-box PGD steps of the evaluation (more than training)
    adv_share: float = 2 / 3  # the paper's (clean + 2 adversarial) / 3
    vs_weight: float = 2.0  # lambda of the VS loss (0.5 lowered vulnerability less, same accuracy)
    # scale of KL / n_train per model: the digits have 1,347 training samples (MNIST 60,000), so
    # the KL weighs ~45x more per sample than in the paper. At 1 (MLP) / 2 (CNN) ANP keeps about
    # 20-25% of the parameters; at 3 every MLP unit but one went.
    kl_weight: Dict[str, float] = field(default_factory=lambda: {"mlp": 1.0, "cnn": 2.0})
    # Adam moves a parameter by ~lr per step: at 10x the weights' rate (the ANP code's) the masks
    # pruned ~10% of the MLP's units in 15 epochs; at 50x the KL and the loss settle in 30.
    mask_lr_scale: float = 50.0
    init_keep: float = 0.9  # keep-probability of every unit at the start (masks start near the trained net)
    # E[pi] under this prunes a unit. The ANP code's 1e-3 is for 200 epochs; after 30 the pruned
    # units sit at 1e-4..1e-2 and the kept ones above 0.3.
    threshold: float = 1e-2
    epochs: Dict[str, int] = field(default_factory=lambda: {"mlp": 30, "cnn": 30})
    # masked networks: epochs learning masks and weights, from the trained standard / AT network
    mask_epochs: Dict[str, int] = field(default_factory=lambda: {"mlp": 30, "cnn": 30})
    lr: float = 2e-3
    batch_size: int = 64
    train_threads: int = 1  # deterministic training (see CompareConfig.train_threads)
    convert_batch_sizes: Tuple[int, ...] = (1, 64)
    timing_batch_sizes: Tuple[int, ...] = (1, 256)
    timing_warmup: int = 2
    timing_repeats: int = 8
    timing_min_time_s: float = 0.15

    def with_(self, **changes) -> "RobustConfig":
        from dataclasses import replace

        return replace(self, **changes)


FULL = RobustConfig()
QUICK = RobustConfig(epochs={"mlp": 4, "cnn": 3}, mask_epochs={"mlp": 3, "cnn": 2}, eval_steps=10, timing_warmup=1, timing_repeats=3,
                     timing_min_time_s=0.0)
# One row per family on the MLP, inside `sparseprune demo`.
DEMO = RobustConfig(models=("mlp",), networks=("standard", "bp", "at", "anp-vs"), epochs={"mlp": 15},
                    mask_epochs={"mlp": 15},
                    timing_repeats=5, timing_min_time_s=0.05)
DEMO_QUICK = DEMO.with_(epochs={"mlp": 4}, mask_epochs={"mlp": 3}, eval_steps=10, timing_repeats=3, timing_min_time_s=0.0)
PRESETS = {"full": FULL, "quick": QUICK, "demo": DEMO, "demo-quick": DEMO_QUICK}


def check_config(config: RobustConfig) -> None:
    if not isinstance(config, RobustConfig):
        raise TypeError(f"config must be a RobustConfig, got {type(config).__name__}")
    bad = [m for m in config.models if m not in ROBUST_MODELS]
    if bad or not config.models:
        raise ValueError(f"models must be a non-empty subset of {tuple(ROBUST_MODELS)}, got {config.models!r}")
    bad = [n for n in config.networks if n not in NETWORKS]
    if bad or not config.networks:
        raise ValueError(f"networks must be a non-empty subset of {tuple(NETWORKS)}, got {config.networks!r}")
    missing = [m for m in config.models if not all(m in d for d in (config.epochs, config.mask_epochs, config.kl_weight))]
    if missing:
        raise ValueError(f"epochs, mask_epochs and kl_weight need an entry for model(s) {missing}")
    if not 0.0 < config.threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {config.threshold!r}")
    if config.eval_steps <= config.train_steps:
        raise ValueError(f"eval_steps ({config.eval_steps}) must exceed train_steps ({config.train_steps})")
    PGD(config.eps, steps=config.train_steps)  # raises ValueError naming eps / steps


def objective_for(network: Network, config: RobustConfig, model: str) -> Optional[RobustObjective]:
    kl_weight = config.kl_weight[model]
    if not network.adversarial:
        return RobustObjective(kl_weight=kl_weight, mask_lr_scale=config.mask_lr_scale) if network.masks else None
    return RobustObjective(PGD(config.eps, steps=config.train_steps), adv_share=config.adv_share,
                           vs_weight=config.vs_weight if network.vs else 0.0, kl_weight=kl_weight,
                           mask_lr_scale=config.mask_lr_scale)


@dataclass
class RobustRow:
    model: str
    network: str
    status: str = "ok"
    message: str = ""
    clean_acc: Optional[float] = None  # deployed (shrunk/converted) model
    pgd_acc: Optional[float] = None  # white-box PGD on the pruned model; deployed model scored on those inputs
    fgsm_acc: Optional[float] = None
    vulnerability: Dict[str, float] = field(default_factory=dict)  # per latent layer
    mean_vulnerability: Optional[float] = None
    units_kept: Dict[str, List[int]] = field(default_factory=dict)  # masked layers: [kept, units]
    units_share: Optional[float] = None  # hidden units kept / hidden units
    params: Optional[int] = None  # nonzero parameters deployed
    params_dense: Optional[int] = None
    bytes_on_disk: Optional[int] = None
    bytes_dense: Optional[int] = None
    deploy: str = ""
    kernels: str = ""
    max_abs_diff: Optional[float] = None
    timing: Dict[str, Dict[str, float]] = field(default_factory=dict)
    train_seconds: Optional[float] = None
    seconds: Optional[float] = None

    @property
    def params_share(self) -> Optional[float]:
        return None if self.params is None or not self.params_dense else self.params / self.params_dense

    def speedup(self, batch: int) -> Optional[float]:
        t = self.timing.get(str(batch))
        return None if t is None else t["speedup"]

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "params_share": self.params_share}


def hidden_units(model: nn.Module) -> int:
    """Output units of every Linear/Conv2d but the last (the classifier's outputs are not prunable)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in layers[:-1])


class RobustRun:
    """One model's rows: the standard network first (it is also the dense baseline timed against)."""

    def __init__(self, model_name: str, data: DataSplit, config: RobustConfig, seed: int, threads: int):
        self.name = model_name
        self.spec = ROBUST_MODELS[model_name]
        self.data = DataSplit(self.spec.prepare(data.x_train).contiguous(), data.y_train,
                              self.spec.prepare(data.x_test).contiguous(), data.y_test)
        self.n_classes = data.n_classes
        self.config = config
        self.seed = seed
        self.threads = threads
        self.dense: Optional[nn.Module] = None  # the standard network, eval mode, run by torch
        self.dense_print = None
        self.bases: Dict[str, Tuple[nn.Module, float]] = {}  # trained standard / AT networks

    def _train(self, model: nn.Module, network: Network, epochs: int, seed: int) -> float:
        cfg = self.config
        seed_everything(seed)
        t0 = time.perf_counter()
        train(model, self.data.x_train, self.data.y_train, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size,
              seed=seed, progress=False, num_threads=cfg.train_threads, objective=objective_for(network, cfg, self.name))
        model.eval()
        return time.perf_counter() - t0

    def trained_base(self, name: str) -> Tuple[nn.Module, float]:
        """The trained unmasked network `name` ("standard" or "at"), trained once and cached."""
        if name not in self.bases:
            seed_everything(row_seed(self.seed, "robust", self.name, "init"))  # every network from one start
            model = self.spec.build(self.data.x_train[:1], self.n_classes)
            secs = self._train(model, NETWORKS[name], self.config.epochs[self.name],
                               row_seed(self.seed, "robust", self.name, name))
            self.bases[name] = (model, secs)
        model, secs = self.bases[name]
        return deepcopy_model(model), secs

    def train_network(self, network: Network) -> Tuple[nn.Module, float]:
        """Unmasked networks train from the common start; masked ones start from the trained
        standard (bp) or AT (anp, anp-vs) network and learn their masks with the weights."""
        from sparseprune.prune.bayesian import add_beta_bernoulli

        cfg = self.config
        if not network.masks:
            if network.name in ("standard", "at"):
                return self.trained_base(network.name)
            seed_everything(row_seed(self.seed, "robust", self.name, "init"))
            model = self.spec.build(self.data.x_train[:1], self.n_classes)
            return model, self._train(model, network, cfg.epochs[self.name],
                                      row_seed(self.seed, "robust", self.name, network.name))
        model, base_secs = self.trained_base("at" if network.adversarial else "standard")
        add_beta_bernoulli(model, init_keep=cfg.init_keep, threshold=cfg.threshold)
        secs = self._train(model, network, cfg.mask_epochs[self.name], row_seed(self.seed, "robust", self.name, network.name))
        return model, base_secs + secs

    def run(self, network: Network) -> RobustRow:
        from sparseprune.prune.bayesian import prune_beta_bernoulli, units_kept

        cfg = self.config
        row = RobustRow(self.name, network.name)
        model, row.train_seconds = self.train_network(network)
        if network.masks:
            row.units_kept = {k: list(v) for k, v in units_kept(model).items()}
            prune_beta_bernoulli(model)
        total_units = hidden_units(model)
        removed = sum(n - k for k, n in row.units_kept.values())
        row.units_share = 1.0 - removed / total_units
        x_te, y_te = self.data.x_test, self.data.y_test
        dep = deploy(model, shrink=network.masks, example=x_te[:1].contiguous(), x_check=x_te,
                     batch_sizes=cfg.convert_batch_sizes, num_threads=self.threads)
        row.deploy, row.kernels, row.max_abs_diff = dep.steps, ",".join(dep.kernels), dep.max_abs_diff
        if network.name == "standard":
            self.dense = deepcopy_model(dep.reference).eval()
            self.dense_print = footprint(self.dense)
        with torch_threads(cfg.train_threads):
            gen = torch.Generator().manual_seed(row_seed(self.seed, "robust", self.name, network.name, "attack"))
            report = evaluate_robustness(dep.reference, x_te, y_te, PGD(cfg.eps, steps=cfg.eval_steps), generator=gen)
            fgsm_x = FGSM(cfg.eps).perturb(dep.reference, x_te, y_te)
            row.clean_acc = float(evaluate_accuracy(dep.model, x_te, y_te))
            row.pgd_acc = float(evaluate_accuracy(dep.model, report.x_adv, y_te))
            row.fgsm_acc = float(evaluate_accuracy(dep.model, fgsm_x, y_te))
        row.vulnerability, row.mean_vulnerability = report.vulnerability, report.mean_vulnerability
        fp = footprint(dep.model)
        row.params, row.bytes_on_disk = fp.params, fp.bytes_on_disk()
        if self.dense is None:
            raise RuntimeError("the standard network must run first: it is the dense baseline")
        row.params_dense, row.bytes_dense = self.dense_print.params, self.dense_print.bytes_on_disk()
        row.timing = time_against_dense(self.dense, dep.model, x_te, batch_sizes=cfg.timing_batch_sizes,
                                        threads=self.threads, warmup=cfg.timing_warmup, repeats=cfg.timing_repeats,
                                        min_time_s=cfg.timing_min_time_s)
        return row


def run_robust(*, config: RobustConfig = FULL, seed: int = 0, data: Optional[Sequence[Any]] = None,
               out: Optional[str] = None, stem: str = "robust", plots: bool = True, strict: bool = False,
               progress: bool = True, log: Callable[[str], None] = tqdm.write) -> Dict[str, Any]:
    """Run the robust comparison; returns its record (what `out`/{stem}.json holds, plus "table",
    "files" and "row_objects")."""
    start = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    check_config(config)
    split, data_name = load_data(seed, data)
    threads = torch.get_num_threads()
    networks = ["standard"] + [n for n in config.networks if n != "standard"]  # the baseline first
    log(f"robust: data {data_name}, eps {config.eps:g}, PGD {config.train_steps} steps in training, "
        f"{config.eval_steps} in evaluation; {threads} thread(s) for conversion and timing")
    rows: List[RobustRow] = []
    bar = tqdm(total=len(config.models) * len(networks), desc="sparseprune compare --robust", unit="net",
               disable=not progress, leave=False)
    try:
        for model_name in config.models:
            try:
                run = RobustRun(model_name, split, config, seed, threads)
            except ValueError as exc:
                if strict:
                    raise
                rows += [RobustRow(model_name, n, status="unavailable", message=str(exc)) for n in networks]
                bar.update(len(networks))
                continue
            for name in networks:
                bar.set_description(f"robust {model_name}: {name}")
                t0 = time.perf_counter()
                try:
                    row = run.run(NETWORKS[name])
                except Exception as exc:  # noqa: BLE001 - every failure becomes a visible row
                    if strict:
                        raise
                    row = RobustRow(model_name, name, status="error", message=f"{type(exc).__name__}: {exc}")
                    log(f"robust {model_name} {name}: error: {row.message}")
                row.seconds = time.perf_counter() - t0
                rows.append(row)
                bar.update()
    finally:
        bar.close()
    record: Dict[str, Any] = {
        "config": {**asdict(config), "seed": seed, "threads": threads, "data": data_name,
                   "n_train": int(split.x_train.shape[0]), "n_test": int(split.x_test.shape[0]),
                   "models": {m: ROBUST_MODELS[m].description for m in config.models},
                   "networks": {n: NETWORKS[n].description for n in networks}},
        "rows": [r.to_dict() for r in rows],
        "targets": targets(rows),
        "timing_spread": max((t[f"{k}_p90_ms"] / t[f"{k}_ms"] for r in rows for t in r.timing.values()
                              for k in ("dense", "ours") if t.get(f"{k}_ms")), default=None),
        "metadata": _metadata(threads),
    }
    table = format_table(rows, config.timing_batch_sizes)
    files: List[str] = []
    if out is not None:
        os.makedirs(out, exist_ok=True)
        files.append(os.path.join(out, f"{stem}.json"))
        files.append(write_csv(os.path.join(out, f"{stem}.csv"), rows, config.timing_batch_sizes))
        table_path = os.path.join(out, f"{stem}_table.txt")
        with open(table_path, "w", encoding="utf-8") as f:
            f.write(table + "\n")
        files.append(table_path)
        if plots:
            files.append(plot(rows, os.path.join(out, f"{stem}_pgd_vs_speedup.png"), config))
    record["wall_time_s"] = time.perf_counter() - start
    if out is not None:
        from sparseprune.experiments.results import write_json

        write_json(files[0], record)
    record.update(files=files, table=table, row_objects=rows)
    return record


def _metadata(threads: int) -> Dict[str, Any]:
    try:
        from sparseprune.bench.metadata import run_metadata

        return run_metadata(threads=[threads])
    except ImportError:  # pragma: no cover - depends on the checkout
        return {"torch_version": torch.__version__, "threads": [threads]}


def targets(rows: Sequence[RobustRow]) -> Dict[str, Dict[str, Any]]:
    """Issue 15's targets, per model, from the rows (None where a row is missing)."""
    out: Dict[str, Dict[str, Any]] = {}
    for model in dict.fromkeys(r.model for r in rows):
        by = {r.network: r for r in rows if r.model == model and r.status == "ok"}
        std, at, anpvs = by.get("standard"), by.get("at"), by.get("anp-vs")
        t: Dict[str, Any] = {}
        if std and at:
            t["at_pgd_minus_standard"] = at.pgd_acc - std.pgd_acc
        if at and anpvs:
            t["anp_vs_pgd_ge_at"] = anpvs.pgd_acc >= at.pgd_acc
            t["anp_vs_params_share_of_at"] = anpvs.params / at.params
            t["anp_vs_units_share"] = anpvs.units_share
            t["anp_vs_vulnerability_below_at"] = anpvs.mean_vulnerability < at.mean_vulnerability
        if anpvs and anpvs.speedup(256) is not None:
            t["anp_vs_speedup_b256"] = anpvs.speedup(256)
        out[model] = t
    return out


# --------------------------------------------------------------------------------------- output
def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _kb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1024:.1f} kB"


def format_table(rows: Sequence[RobustRow], batch_sizes: Sequence[int]) -> str:
    small, big = batch_sizes[0], batch_sizes[-1]
    header = ["network", "model", "clean acc", "PGD acc", "FGSM acc", "vulnerability (mean; per layer)",
              "units kept", "params", f"b{small} ms dense/ours", f"speedup b{small}", f"speedup b{big}",
              "bytes on disk", "status"]
    body = []
    for r in rows:
        if r.status != "ok":
            body.append([r.network, r.model] + ["-"] * 10 + [f"{r.status}: {r.message[:60]}"])
            continue
        vul = f"{r.mean_vulnerability:.3f}; " + "/".join(f"{v:.3f}" for v in r.vulnerability.values())
        t1 = r.timing.get(str(small))
        lat = "-" if t1 is None else f"{t1['dense_ms']:.3f}/{t1['ours_ms']:.3f}"
        sp = [("-" if r.speedup(b) is None else f"{r.speedup(b):.2f}x") for b in (small, big)]
        body.append([r.network, r.model, _pct(r.clean_acc), _pct(r.pgd_acc), _pct(r.fgsm_acc), vul,
                     _pct(r.units_share), f"{r.params} ({_pct(r.params_share)})", lat, sp[0], sp[1],
                     _kb(r.bytes_on_disk), "ok"])
    widths = [max([len(header[i])] + [len(b[i]) for b in body]) for i in range(len(header))]
    left = {0, 1, 5, len(header) - 1}

    def line(cells: Sequence[str]) -> str:
        return " | ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])


CSV_FIELDS = ["model", "network", "status", "message", "clean_acc", "pgd_acc", "fgsm_acc", "mean_vulnerability",
              "units_share", "params", "params_dense", "params_share", "bytes_on_disk", "bytes_dense", "deploy",
              "kernels", "max_abs_diff", "train_seconds", "seconds"]


def write_csv(path: str, rows: Sequence[RobustRow], batch_sizes: Sequence[int]) -> str:
    layer_names = list(dict.fromkeys(f"vulnerability_{k}" for r in rows for k in r.vulnerability))
    timing = [f"{k}_b{b}" for b in batch_sizes for k in ("dense_ms", "ours_ms", "speedup", "speedup_min")]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + layer_names + timing)
        writer.writeheader()
        for r in rows:
            d = r.to_dict()
            flat = {k: d[k] for k in CSV_FIELDS}
            flat.update({f"vulnerability_{k}": v for k, v in r.vulnerability.items()})
            for b in batch_sizes:
                t = r.timing.get(str(b), {})
                for k in ("dense_ms", "ours_ms", "speedup", "speedup_min"):
                    flat[f"{k}_b{b}"] = t.get(k)
            writer.writerow(flat)
    return path


def plot(rows: Sequence[RobustRow], path: str, config: RobustConfig) -> str:
    """PGD accuracy against the batch-256 speedup over torch dense, one panel per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    big = config.timing_batch_sizes[-1]
    models = list(dict.fromkeys(r.model for r in rows))
    fig = Figure(figsize=(5.5 * len(models) + 2.0, 4.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    markers = dict(zip(NETWORKS, "osD^vP"))
    for ax, model in zip(axes, models):
        for r in rows:
            if r.model != model or r.status != "ok" or r.speedup(big) is None:
                continue
            ax.scatter([r.speedup(big)], [r.pgd_acc], marker=markers[r.network], s=50, label=r.network)
            ax.annotate(f"{r.network} ({100 * r.params_share:.0f}% params)", (r.speedup(big), r.pgd_acc),
                        textcoords="offset points", xytext=(5, 4), fontsize="x-small")
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{model}: PGD accuracy (eps {config.eps:g}) vs speed", ylabel="PGD accuracy",
               xlabel=f"speedup over torch dense at batch {big}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------------ cli
def config_from_args(args: argparse.Namespace) -> RobustConfig:
    cfg = PRESETS["quick" if getattr(args, "quick", False) else "full"]
    models = getattr(args, "models", None)
    if models:
        cfg = cfg.with_(models=tuple(dict.fromkeys(models)))
    epochs = getattr(args, "dense_epochs", None)
    if epochs is not None:  # every training stage
        cfg = cfg.with_(epochs={m: epochs for m in cfg.epochs}, mask_epochs={m: epochs for m in cfg.mask_epochs})
    return cfg


def print_report(record: Dict[str, Any]) -> None:
    cfg = record["config"]
    print(f"\nrobust results ({cfg['data']}, test set of {cfg['n_test']}; eps {cfg['eps']:g}; PGD accuracy: "
          f"{cfg['eval_steps']}-step white-box PGD with random start; speed of the deployed network against "
          f"the standard network run dense by torch, {cfg['threads']} thread(s)):")
    print(record["table"])
    for model, t in record["targets"].items():
        print(f"targets, {model}: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                                  for k, v in t.items()))
    spread = record.get("timing_spread")
    if spread is not None and spread > NOISY_SPREAD:
        print(f"note: timings were noisy (p90 up to {spread:.1f}x the median): something else was using the CPU; "
              "rerun for stable speedups")
    for path in record.get("files", []):
        print(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    """`sparseprune compare --robust` from compare's parsed arguments."""
    t0 = time.perf_counter()
    try:
        data = None
        if getattr(args, "data", None):
            from sparseprune.compare import load_npz

            data = load_npz(args.data, args.seed)
        record = run_robust(config=config_from_args(args), seed=args.seed, data=data, out=args.out,
                            plots=args.plots, strict=args.strict, progress=args.progress)
    except (RuntimeError, ValueError, TypeError, OSError) as exc:
        print(f"sparseprune compare --robust: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print_report(record)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0
