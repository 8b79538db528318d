"""The built-in method runners; importing this package registers them (in this order)."""
from sparseprune.experiments.methods import (  # noqa: F401 (registration on import)
    unstructured,
    saliency,
    structured,
    depth,
    ensemble,
    gates,
)
