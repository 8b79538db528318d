"""Serve executables over HTTP with the Open Inference Protocol (KServe v2), dynamic batching and
Prometheus metrics: `sparseprune serve MODEL.safetensors` or, inside an ASGI app,

    from sparseprune.serve import create_app
    app = create_app(["resnet.safetensors"], max_batch=32, max_wait_ms=5)

Needs the serve extra (pip install "sparseprune[serve]": Starlette, uvicorn, prometheus_client);
Ray Serve deployments are in sparseprune.serve.ray (the ray extra). Like the runtime, nothing
here imports torch.
"""


def __getattr__(name: str):
    # Imported on first use, so that the command line reads sparseprune.serve.defaults without the extra.
    if name == "create_app":
        from sparseprune.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'sparseprune.serve' has no attribute {name!r}")


__all__ = ["create_app"]
