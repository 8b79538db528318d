"""Helpers of the serve tests: small executables compiled here, and a real uvicorn server on an
ephemeral 127.0.0.1 port in a thread, stopped (gracefully) at the end, with timeouts everywhere."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Dict, Iterator

import torch
from torch import nn

import sparseprune as sp
from sparseprune.bench.models import TinyTransformer

START_SECONDS = 10.0  # uvicorn starts in ~0.1 s; a busy machine gets this much


def compile_models(directory: Path) -> Dict[str, Path]:
    """mlp: float32 x [batch, 6] -> [batch, 3]; tagger: int64 ids [batch, seq] (seq 1..32) ->
    [batch, seq, 5]. Pruned, kernels by threshold (no timing), saved under `directory`."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    for layer in (mlp[0], mlp[2]):
        sp.prune.magnitude(layer, 0.5)
    tagger = TinyTransformer().eval()
    paths = {"mlp": directory / "mlp.safetensors", "tagger": directory / "tagger.safetensors"}
    sp.compile(mlp, (torch.randn(2, 6),), policy="threshold").save(paths["mlp"])
    seq = torch.export.Dim("seq", min=2, max=32)
    sp.compile(tagger, (torch.randint(0, 30, (2, 7)),), dynamic_shapes={"ids": {1: seq}},
               policy="threshold").save(paths["tagger"])
    return paths


@contextlib.contextmanager
def serving(app, log_level: str = "warning") -> Iterator[str]:
    """Run `app` under uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL. Leaving
    the block stops it as SIGTERM would (should_exit: requests in flight answered, lifespan drains)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop within 30 s"
