"""Load test of `sparseprune serve` (issue 13): throughput, p50/p99 latency, batch sizes formed and
errors against concurrency, with dynamic batching on and off, for the BERT layer and ResNet-18
executables; plus a soak (60 s at concurrency 32: sent = answered, errors, the server's RSS after
warm-up and at the end) and the server's overhead per request over Executable.run at
concurrency 1 on a small model.

The server runs as `sparseprune serve` in a subprocess (torch-free, --threads), on 127.0.0.1 and
an ephemeral port; the load generator is an async closed loop (httpx.AsyncClient): C workers each
send one request (one row, binary tensor extension), wait for the answer, send the next. Every
point is bounded (--seconds of load and a timeout per request) and stops by itself; the server
is stopped with SIGTERM and must exit 0. Batch sizes come from the server's /metrics
(sparseprune_batch_rows) before and after each point. Every point's first answer is checked
against Executable.run on the same row (bit for bit with batching off, fp32 tolerance on).

Models (90% magnitude-pruned, compiled with kernels timed at batch 1 and 16, cached in --workdir):
  bert      the BERT-base encoder layer of bench_executable.py, sequence 128 ([1, 128, 768] per row)
  resnet18  ResNet-18 at 224x224 ([1, 3, 224, 224] per row)
  small     BERT-FFN 768 -> 3072 -> 768 -> 768 (for the overhead at concurrency 1)

Run from the repository root: python benchmarks/bench_serve.py [--json F] [--markdown F]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

from sparseprune.runtime import load

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_*.py sit next to this script
from bench_common import log  # noqa: E402

MODELS = ("bert", "resnet18")
REQUEST_TIMEOUT = 60.0  # seconds per request: a stuck server fails the point, never hangs it


def build_executables(workdir: str, threads: int) -> Dict[str, str]:
    """Compile (once; reused from workdir) the three executables; name -> path."""
    paths = {name: os.path.join(workdir, f"{name}.safetensors") for name in (*MODELS, "small")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    import torch

    import sparseprune
    from bench_executable import bert_layer, resnet
    from sparseprune.bench import build_model, prune_linear_layers

    torch.set_num_threads(threads)
    small, _ = build_model("bert-ffn")
    prune_linear_layers(small, 0.9)
    builders = {"bert": (lambda: bert_layer(0.9, 0), (128, 768)), "resnet18": (lambda: resnet(0.9, 0), (3, 224, 224)),
                "small": (lambda: small.eval(), (768,))}
    os.makedirs(workdir, exist_ok=True)
    for name, (build, shape) in builders.items():
        if os.path.exists(paths[name]):
            continue
        t0 = time.perf_counter()
        exe = sparseprune.compile(build(), (torch.randn(1, *shape),), batch_sizes=(1, 16), num_threads=threads)
        exe.save(paths[name])
        log(f"compiled {name} in {time.perf_counter() - t0:.0f} s -> {paths[name]}")
    return paths


# ------------------------------------------------------------------------------------ the server
class Server:
    """`sparseprune serve` in a subprocess on 127.0.0.1:<free port>; stop() sends SIGTERM."""

    def __init__(self, paths: Dict[str, str], threads: int, batching: bool, max_batch: int, max_wait_ms: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "sparseprune", "serve", *paths.values(), "--port", str(self.port),
               "--threads", str(threads), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
               "--max-queue", "1024"]
        if not batching:
            cmd.append("--no-batching")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        self.input_names = {name: load(path).input_names[0] for name, path in paths.items()}
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not get ready in 120 s")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024

    def stop(self) -> int:
        """The exit status after SIGTERM: 0 or -SIGTERM (uvicorn drains, then re-raises the signal)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return -9


def histograms(url: str, model: str) -> Dict[str, float]:
    """From the server's /metrics for `model`: sparseprune_batch_rows (count, sum, le_* buckets)
    and sparseprune_run_seconds (run_count, run_sum)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: Dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if family.name not in ("sparseprune_batch_rows", "sparseprune_run_seconds"):
            continue
        prefix = "run_" if family.name == "sparseprune_run_seconds" else ""
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name.endswith("_count"):
                out[prefix + "count"] = s.value
            elif s.name.endswith("_sum"):
                out[prefix + "sum"] = s.value
            elif s.name.endswith("_bucket") and not prefix:
                out[f"le_{s.labels['le']}"] = s.value
    return out


def binary_request(name: str, x: np.ndarray):
    head = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"}


def decode_output(response) -> np.ndarray:
    n = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:n])
    first = head["outputs"][0]
    size = first["parameters"]["binary_data_size"]
    return np.frombuffer(response.content, dtype="<f4", count=size // 4, offset=n).reshape(first["shape"])


# ----------------------------------------------------------------------------------- load
async def closed_loop(url: str, model: str, body: bytes, headers: Dict[str, str], concurrency: int,
                      seconds: float, max_requests: int) -> Dict[str, Any]:
    """C workers, each sending its next request when its last is answered, for `seconds` (or
    `max_requests` in all). Returns latencies (s) of the 200s, error counts by status, sent,
    answered, wall time and one answer."""
    import httpx

    latencies: List[float] = []
    errors: Dict[str, int] = {}
    sent = answered = 0
    first: List[Any] = []
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=limits) as client:
        async def worker():
            nonlocal sent, answered
            while time.monotonic() < stop_at and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                answered += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    if not first:
                        first.append(r)
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                               seconds + REQUEST_TIMEOUT + 10)
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": errors, "sent": sent, "answered": answered, "wall_s": wall,
            "first": first[0] if first else None}


def percentile(values: List[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


def run_point(server: Server, model: str, x: np.ndarray, want: np.ndarray, batching: bool, concurrency: int,
              seconds: float) -> Dict[str, Any]:
    body, headers = binary_request(server.input_names[model], x)
    before = histograms(server.url, model)
    res = asyncio.run(closed_loop(server.url, model, body, headers, concurrency, seconds, max_requests=10 ** 6))
    after = histograms(server.url, model)
    lat = res["latencies"]
    diff = None
    if res["first"] is not None:
        got = decode_output(res["first"])
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    calls = after.get("count", 0) - before.get("count", 0)
    rows = after.get("sum", 0) - before.get("sum", 0)
    buckets = {k: after[k] - before.get(k, 0) for k in after if k.startswith("le_")}
    run_s = after.get("run_sum", 0) - before.get("run_sum", 0)
    row = {"model": model, "batching": batching, "concurrency": concurrency, "seconds": res["wall_s"],
           "sent": res["sent"], "answered": res["answered"], "ok": len(lat), "errors": res["errors"],
           "throughput_rps": len(lat) / res["wall_s"], "p50_ms": _ms(percentile(lat, 50)),
           "p99_ms": _ms(percentile(lat, 99)), "calls": calls, "mean_batch_rows": rows / calls if calls else None,
           "mean_run_ms": round(1000 * run_s / calls, 3) if calls else None,
           "batch_rows_buckets": buckets, "max_abs_diff_vs_run": diff}
    log(f"{model} batching={'on' if batching else 'off'} c={concurrency}: {row['throughput_rps']:.1f} req/s, "
        f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, mean batch {row['mean_batch_rows']}, "
        f"sent {row['sent']} answered {row['answered']} errors {row['errors']}, diff {diff}")
    return row


def _ms(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v * 1000, 3)


def http_floor_ms(url: str, n: int = 300) -> float:
    """Median round trip (ms) of GET /v2/health/live with the same client: what HTTP itself costs
    here (client, loopback, uvicorn), below any inference."""
    import httpx

    async def loop():
        times = []
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as client:
            for i in range(n + 20):
                t0 = time.perf_counter()
                await client.get("/v2/health/live")
                if i >= 20:
                    times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    return asyncio.run(loop())


def run_median_ms(exe, x: np.ndarray, seconds: float = 3.0) -> float:
    """Executable.run's median time (ms) on x, in this process."""
    for _ in range(5):
        exe.run(x)
    times = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop or len(times) < 20:
        t0 = time.perf_counter()
        exe.run(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="comma-separated (default: 1,2,4,8,16,32,64)")
    p.add_argument("--seconds", type=float, default=8.0, help="load per point (default: 8)")
    p.add_argument("--soak-seconds", type=float, default=60.0,
                   help="the soak: ResNet-18, batching on, concurrency 32 (default: 60; 0 skips it)")
    p.add_argument("--threads", type=int, default=2, help="the server's --threads (default: 2)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms (default: 5)")
    p.add_argument("--workdir", default="/tmp/bench_serve", help="compiled executables, reused (default: /tmp/bench_serve)")
    p.add_argument("--json", default="bench_serve.json", help="default: bench_serve.json")
    p.add_argument("--markdown", help="also write the Markdown table here")
    args = p.parse_args(argv)
    models = args.models.split(",")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if not set(models) <= set(MODELS) or any(c < 1 for c in concurrency):
        p.error(f"--models must be of {MODELS}, --concurrency positive ints")

    from sparseprune.bench import run_metadata

    started = time.time()
    paths = build_executables(args.workdir, args.threads)
    exes = {name: load(path, n_threads=args.threads) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((1, *exe.input_shapes[0])).astype(np.float32) for name, exe in exes.items()}
    rows: List[Dict[str, Any]] = []
    served = {name: paths[name] for name in (*models, "small")}
    for batching in (True, False):
        server = Server(served, args.threads, batching, args.max_batch, args.max_wait_ms)
        try:
            for model in models:
                want = exes[model].run(inputs[model])
                run_point(server, model, inputs[model], want, batching, 1, 2.0)  # warm-up, not kept
                for c in concurrency:
                    rows.append(run_point(server, model, inputs[model], want, batching, c, args.seconds))
            # overhead: the small model at concurrency 1 over HTTP vs Executable.run here, server idle
            small = run_point(server, "small", inputs["small"], exes["small"].run(inputs["small"]), batching, 1,
                              args.seconds)
            small["section"] = "overhead"
            small["run_median_ms"] = run_median_ms(exes["small"], inputs["small"])
            small["http_floor_ms"] = http_floor_ms(server.url)
            small["overhead_ms"] = small["p50_ms"] - small["run_median_ms"]
            rows.append(small)
            log(f"overhead (batching {'on' if batching else 'off'}): HTTP p50 {small['p50_ms']:.3f} ms, "
                f"Executable.run {small['run_median_ms']:.3f} ms -> {small['overhead_ms']:.3f} ms")
        finally:
            code = server.stop()
        rows.append({"section": "shutdown", "batching": batching, "exit_code": code})
    if args.soak_seconds > 0 and "resnet18" in models:
        server = Server({"resnet18": paths["resnet18"]}, args.threads, True, args.max_batch, args.max_wait_ms)
        try:
            model, x = "resnet18", inputs["resnet18"]
            warm = run_point(server, model, x, exes[model].run(x), True, 32, 10.0)
            rss_warm = server.rss_mb()
            soak = run_point(server, model, x, exes[model].run(x), True, 32, args.soak_seconds)
            soak.update({"section": "soak", "rss_after_warmup_mb": rss_warm, "rss_end_mb": server.rss_mb(),
                         "warmup_ok": warm["ok"]})
            rows.append(soak)
            log(f"soak: sent {soak['sent']} answered {soak['answered']} errors {soak['errors']}, RSS "
                f"{rss_warm:.0f} -> {soak['rss_end_mb']:.0f} MB")
        finally:
            rows.append({"section": "shutdown", "batching": True, "exit_code": server.stop(), "after": "soak"})
    meta = run_metadata([args.threads])
    meta["command"] = " ".join(["python", *sys.argv])
    meta["server"] = {"threads": args.threads, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms}
    meta["elapsed_s"] = time.time() - started
    result = {"metadata": meta, "rows": rows}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    print(md)
    return 0


def markdown(result: Dict[str, Any]) -> str:
    meta = result["metadata"]
    s = meta["server"]
    lines = [f"`{meta['command']}`", "",
             f"CPU: {meta['cpu']} ({meta['cpu_count']} cores, shared by the server and the load generator); "
             f"server --threads {s['threads']} --max-batch {s['max_batch']} --max-wait-ms {s['max_wait_ms']:g}; "
             f"one row per request, binary tensors; git {str(meta['git_revision'])[:10]}", "",
             "| model | batching | concurrency | req/s | p50 ms | p99 ms | mean batch rows | mean run ms | sent | answered | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "section" in r:
            continue
        mean = "" if r["mean_batch_rows"] is None else f"{r['mean_batch_rows']:.1f}"
        lines.append(f"| {r['model']} | {'on' if r['batching'] else 'off'} | {r['concurrency']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']} | {r['p99_ms']} | {mean} | {r['mean_run_ms']} | {r['sent']} | "
                     f"{r['answered']} | {sum(r['errors'].values())} |")
    for r in result["rows"]:
        if r.get("section") == "overhead":
            lines.append(f"\nOverhead (small model, concurrency 1, batching {'on' if r['batching'] else 'off'}): "
                         f"HTTP p50 {r['p50_ms']:.3f} ms, Executable.run median {r['run_median_ms']:.3f} ms: "
                         f"{r['overhead_ms']:.3f} ms per request (GET /v2/health/live round trip with the same "
                         f"client: {r['http_floor_ms']:.3f} ms)")
        elif r.get("section") == "soak":
            lines.append(f"\nSoak (resnet18, batching on, concurrency 32, {r['seconds']:.0f} s): sent {r['sent']}, "
                         f"answered {r['answered']}, errors {sum(r['errors'].values())}, {r['throughput_rps']:.1f} "
                         f"req/s, p99 {r['p99_ms']} ms; server RSS {r['rss_after_warmup_mb']:.0f} MB after warm-up, "
                         f"{r['rss_end_mb']:.0f} MB at the end")
        elif r.get("section") == "shutdown":
            clean = "clean" if r["exit_code"] in (0, -signal.SIGTERM) else "NOT CLEAN"
            lines.append(f"\nSIGTERM ({'batching on' if r['batching'] else 'batching off'}"
                         f"{', after the soak' if r.get('after') else ''}): exit status {r['exit_code']} ({clean})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
