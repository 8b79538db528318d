"""Structural shrink: delete pruned channels and units for good, returning a smaller dense model.

`shrink(model, example_inputs)` follows the traced data flow (torch.fx) so that a removed
channel disappears from its producer, its BatchNorm, the elementwise ops after it and every
consumer, through residual adds, concatenations, flatten and depthwise convs; constants that
removed channels still carried are folded into the consumers' biases when that is exact. See
`shrink` for the rules and `ShrinkReport` for what it tells you.
"""
from sparseprune.shrink.api import shrink
from sparseprune.shrink.graph import Flow, ShrinkContext, ShrinkError
from sparseprune.shrink.handlers import ShrinkHandler, handler_for, register_shrink_handler
from sparseprune.shrink.report import KeptChannels, LayerShrink, ShrinkReport

__all__ = [
    "Flow",
    "KeptChannels",
    "LayerShrink",
    "ShrinkContext",
    "ShrinkError",
    "ShrinkHandler",
    "ShrinkReport",
    "handler_for",
    "register_shrink_handler",
    "shrink",
]
