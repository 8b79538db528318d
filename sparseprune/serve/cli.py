"""`sparseprune serve MODEL.safetensors [MORE...]`: the arguments, and uvicorn running the app.

Imported by sparseprune.cli only when the command runs (the serve extra stays optional).
"""
from __future__ import annotations

import argparse

from sparseprune.serve.defaults import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY, DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT_MS


def add_arguments(p: argparse.ArgumentParser, positive_int, positive_number) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="executable files (from `sparseprune compile`), each served under its file name without "
                        "the extension; NAME=PATH names one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, metavar="ROWS",
                   help=f"rows per executable call; a request with more is refused (413) (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS, metavar="MS",
                   help=f"how long a request waits for others to batch with (default: {DEFAULT_MAX_WAIT_MS:g})")
    p.add_argument("--no-batching", dest="batching", action="store_false",
                   help="run every request as its own executable call")
    p.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"requests waiting per model; beyond, 429 (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-body", type=positive_int, default=DEFAULT_MAX_BODY, metavar="BYTES",
                   help=f"largest request body; beyond, 413 (default: {DEFAULT_MAX_BODY} = 64 MiB)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="threads of each model's executable calls (default: OpenMP's)")
    p.add_argument("--max-work", type=positive_number, default=None, metavar="FLOP",
                   help="refuse (413) requests needing more FLOP, counted from the spec (default: Limits())")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default: warning)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from sparseprune.runtime import Limits
    from sparseprune.serve.app import create_app, model_name

    models = {}
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = model_name(item), item
        if name in models:
            args.parser.error(f"two models are named {name!r}: name one with NAME=PATH")
        models[name] = path
    defaults = Limits()
    limits = Limits(max_batch=max(args.max_batch, defaults.max_batch),
                    max_work=args.max_work if args.max_work is not None else defaults.max_work)
    app = create_app(models, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                     max_body_bytes=args.max_body, batching=args.batching, threads=args.threads, limits=limits)
    print(f"sparseprune serve: {', '.join(models)} on http://{args.host}:{args.port} "
          f"(batching {'on' if args.batching else 'off'}, max batch {args.max_batch} rows, "
          f"max wait {args.max_wait_ms:g} ms)", flush=True)
    # uvicorn stops on SIGINT/SIGTERM: new connections refused, requests in flight answered, then
    # the app's lifespan drains the queues.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
