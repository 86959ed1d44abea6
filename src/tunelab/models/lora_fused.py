"""LoRA's update folded into one matrix product: ``base(x) + s * (x A^T) B^T`` as ``addmm(base(x), x A^T, B^T, alpha=s)``.

PEFT's LoRA linear layer computes ``result + lora_B(lora_A(x)) * scaling``: the rank-r product, then a
full-width multiply by the scaling and a full-width add, each a pass over a [tokens, out_features]
tensor, and the multiply again in the backward pass. For a rank-8 adapter on every linear layer of
a small model those passes cost more than the rank-r products themselves (on this CPU about 4% of a
SmolLM2 LoRA step). ``addmm`` does the scaling and the add inside the GEMM. Same result and
gradients (``tests/unit/models/test_lora_fused.py``); the adapter's weights, state dict and saved files are
PEFT's own. Anything outside plain LoRA (dropout, DoRA and other variants, a LoRA bias, several
or disabled adapters, merged weights, mixed-adapter batches, a dtype cast) takes PEFT's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


class FusedLoraLinear(LoraLinear):
    """PEFT's ``lora.Linear`` with the plain-LoRA forward as one ``addmm``; PEFT's forward otherwise."""

    def _fused_adapter(self, x: torch.Tensor, kwargs: dict[str, Any]) -> str | None:
        if self.disable_adapters or self.merged or kwargs or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or getattr(self, "fan_in_fan_out", False):
            return None
        if not isinstance(self.lora_dropout[name], torch.nn.Identity) or self.lora_B[name].bias is not None:
            return None
        if x.dtype != self.lora_A[name].weight.dtype:
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if args else self._fused_adapter(x, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        lora_a: Any = self.lora_A[name]
        lora_b: Any = self.lora_B[name]
        a = torch.nn.functional.linear(x, lora_a.weight)  # [..., r]
        b = lora_b.weight  # [out, r]
        if result.dtype != a.dtype:
            return super().forward(x)
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]), b.t(),
                           alpha=self.scaling[name])
        return flat.view(result.shape)


def fuse_lora_updates(model: Any) -> int:
    """Switch every plain PEFT ``lora.Linear`` of ``model`` to ``FusedLoraLinear``; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and isinstance(module.base_layer, torch.nn.Linear):
            module.__class__ = FusedLoraLinear
            n += 1
    return n
