"""``tunelab plan``: how much GPU memory a recipe needs, what its data looks like, which strategy fits.

``memory`` (the estimate, with each method's terms from its ``Method.memory_terms``), ``data`` (length
histograms and loss masks through the pipeline's encoders), ``report`` (what the command prints).
"""

from __future__ import annotations

from tunelab.plan.data import LengthHistogram, length_histograms, render_examples, render_first_example
from tunelab.plan.memory import (
    Estimate,
    ModelShape,
    Plan,
    activation_bytes_per_token,
    adapter_params,
    estimate,
    model_shape,
    parse_memory,
)
from tunelab.plan.report import format_plan, run_plan

__all__ = ["Estimate", "LengthHistogram", "ModelShape", "Plan", "activation_bytes_per_token", "adapter_params",
           "estimate", "format_plan", "length_histograms", "model_shape", "parse_memory", "render_examples",
           "render_first_example", "run_plan"]
