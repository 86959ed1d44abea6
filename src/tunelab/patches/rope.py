"""RoPE context extension: PI, NTK-aware, dynamic NTK, NTK-by-parts and YaRN (seed 004 §5).

RoPE rotates dimension pair d of a head of size D by the angle m·θ_d at position m, with
θ_d = b^(-2d/D). A model trained on L tokens has seen angles only up to L·θ_d. Extending it to
L' = s·L tokens changes the frequencies (and, for YaRN, the attention temperature):

- ``linear`` (position interpolation, Chen et al. 2023): θ_d / s for every pair.
- ``ntk`` (static NTK-aware, bloc97): a larger base b' = b · s^(D/(D-2)). High frequencies barely
  change and the lowest one is divided by exactly s.
- ``dynamic_ntk`` (emozilla): the NTK-aware base, recomputed from the current length n,
  b' = b · (s·n/L - (s-1))^(D/(D-2)) once n > L. Shorter inputs keep the original frequencies.
- ``ntk_by_parts`` (bloc97; Peng et al. 2023, §3.2): leave the pairs that rotate more than β
  times over L untouched, interpolate those that rotate fewer than α times by s, and blend in
  between. Defaults α = beta_slow = 1, β = beta_fast = 32, the paper's values for Llama. As in the
  YaRN authors' code and in transformers, the blend is linear in the pair index between the
  pairs where r(d) = L/λ_d crosses β and α (rounded outwards), not linear in r.
- ``yarn`` (Peng et al. 2023): NTK-by-parts plus the temperature sqrt(1/t) = 0.1·ln(s) + 1. It
  multiplies cos and sin, so q·k, and with it every attention logit, scales by (0.1·ln(s) + 1)^2.

All five are stored in ``config.rope_parameters`` in a form that plain transformers and vLLM read:
``linear`` -> linear, ``ntk`` -> default with ``rope_theta`` = b', ``dynamic_ntk`` -> dynamic,
``ntk_by_parts`` -> yarn with ``attention_factor: 1.0``, ``yarn`` -> yarn. So a saved model needs
no code of ours to load. The frequencies and the attention factor are computed here. When the
patch is applied, the model's rebuilt rotary module is checked against them: the patch fails if
transformers would rotate differently.

Guards against the mistakes this patch exists to avoid:
- ``rope_theta`` is carried into the new parameters. Replacing ``rope_scaling`` after
  construction drops it.
- ``original_max_position_embeddings`` is the length before extension, the model's own unless
  given. Left out, transformers' yarn takes the new maximum.
- A factor that disagrees with ``target_length`` is refused.
- ``max_position_embeddings`` and the tokenizer's ``model_max_length`` become the new length.
  ``dynamic_ntk`` is the exception: transformers and vLLM read its ``max_position_embeddings``
  as the original length, so that stays.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tunelab.errors import Problem
from tunelab.patches.base import Patch
from tunelab.specs import PatchBlock

if TYPE_CHECKING:
    import torch

RopeMethod = Literal["linear", "ntk", "dynamic_ntk", "ntk_by_parts", "yarn"]
RAMP_METHODS = ("ntk_by_parts", "yarn")


class RopePatch(PatchBlock):
    """Extend the context of a RoPE model by a factor (or to a target length)."""

    name: Literal["rope"] = Field(description="rope: extend the context of a RoPE model")
    method: RopeMethod = Field(description="linear (PI) | ntk | dynamic_ntk | ntk_by_parts | yarn")
    factor: float | None = Field(None, gt=1, description="s = new length / original length")
    target_length: int | None = Field(None, ge=2, description="the new length; factor = target / original")
    original_max_position_embeddings: int | None = Field(
        None, ge=1, description="the length the model was trained at (default: its max_position_embeddings)")
    beta_fast: float | None = Field(None, gt=0, description="ntk_by_parts/yarn: β, pairs rotating more than β "
                                    "times over the original length are left alone (default 32)")
    beta_slow: float | None = Field(None, gt=0, description="ntk_by_parts/yarn: α, pairs rotating fewer than α "
                                    "times are interpolated by s (default 1)")
    attention_factor: float | None = Field(None, gt=0, description="yarn: the factor on cos and sin "
                                           "(default 0.1 ln s + 1)")

    @model_validator(mode="after")
    def _check(self) -> "RopePatch":
        if self.factor is None and self.target_length is None:
            raise ValueError("give factor (e.g. factor: 4) or target_length (e.g. target_length: 8192)")
        if self.method not in RAMP_METHODS:
            for key in ("beta_fast", "beta_slow"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to ntk_by_parts and yarn, not {self.method}: remove it")
        if self.attention_factor is not None and self.method != "yarn":
            raise ValueError(f"attention_factor applies to yarn only, not {self.method}: remove it")
        if (self.beta_fast or 32.0) <= (self.beta_slow or 1.0):
            raise ValueError(f"beta_fast ({self.beta_fast or 32.0}) must be larger than beta_slow "
                             f"({self.beta_slow or 1.0})")
        return self

    def resolve(self, model_max_position_embeddings: int, where: str = "patches") -> tuple[int, float]:
        """(original length, factor) for a model, or raise ValueError naming the disagreement."""
        original = self.original_max_position_embeddings or model_max_position_embeddings
        if self.factor is not None and self.target_length is not None:
            if abs(self.factor * original - self.target_length) > 0.5:
                raise ValueError(f"factor {self.factor:g} x original length {original} = "
                                 f"{self.factor * original:g}, not target_length {self.target_length}: "
                                 "give one of them, or make them agree")
            return original, float(self.factor)
        if self.factor is not None:
            return original, float(self.factor)
        assert self.target_length is not None  # the validator asks for factor or target_length
        factor = self.target_length / original
        if factor <= 1:
            raise ValueError(f"target_length {self.target_length} is not longer than the original length "
                             f"{original}: nothing to extend")
        return original, factor


# ---- the frequencies ------------------------------------------------------------------------------


def rotary_dim(config: Any) -> int:
    """How many dimensions of a head are rotated: head_dim x partial_rotary_factor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(head_dim * partial)


def base_inv_freq(base: float, dim: int, device: Any = None) -> "torch.Tensor":
    """θ_d = b^(-2d/D) for d = 0 .. D/2-1 (float32, in the order transformers computes them)."""
    import torch

    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base**exponents)


def ntk_base(base: float, factor: float, dim: int) -> float:
    """NTK-aware base b · s^(D/(D-2)): the lowest frequency then falls by exactly s."""
    return base * factor ** (dim / (dim - 2))


def correction_dim(rotations: float, dim: int, base: float, original: int) -> float:
    """The (fractional) pair index whose wavelength fits ``rotations`` times into ``original`` tokens.

    Solves original / λ_d = rotations for d, with λ_d = 2π b^(2d/D).
    """
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))


def ramp_extrapolation_weight(dim: int, base: float, original: int, beta_fast: float,
                              beta_slow: float) -> "torch.Tensor":
    """γ_d per pair: 1 keeps θ_d (extrapolate), 0 takes θ_d/s (interpolate), linear in d between.

    The boundaries are the correction dims of β (fast) and α (slow), rounded outwards and kept
    inside [0, D-1].
    """
    import torch

    low = max(math.floor(correction_dim(beta_fast, dim, base, original)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001  # one pair is the whole blend: avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return 1 - ramp


def yarn_attention_factor(factor: float) -> float:
    """sqrt(1/t) = 0.1 ln s + 1 (1 for s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def scaled_inv_freq(method: str, base: float, dim: int, factor: float, original: int, seq_len: int | None = None,
                    beta_fast: float | None = None, beta_slow: float | None = None,
                    attention_factor: float | None = None) -> tuple["torch.Tensor", float]:
    """(inverse frequencies, attention factor on cos/sin) of an extension method.

    ``seq_len`` matters only for ``dynamic_ntk`` (the length being processed; default: original).
    """
    if method == "linear":
        return base_inv_freq(base, dim) / factor, 1.0
    if method == "ntk":
        return base_inv_freq(ntk_base(base, factor, dim), dim), 1.0
    if method == "dynamic_ntk":
        n = max(seq_len or original, original)
        return base_inv_freq(base * (factor * n / original - (factor - 1)) ** (dim / (dim - 2)), dim), 1.0
    if method in RAMP_METHODS:
        theta = base_inv_freq(base, dim)
        keep = ramp_extrapolation_weight(dim, base, original, beta_fast or 32.0, beta_slow or 1.0)
        inv_freq = theta / factor * (1 - keep) + theta * keep
        if method == "ntk_by_parts":
            return inv_freq, 1.0
        return inv_freq, attention_factor if attention_factor is not None else yarn_attention_factor(factor)
    raise ValueError(f"unknown RoPE extension method {method!r}")


# ---- applying it ----------------------------------------------------------------------------------


def rope_parameters(spec: RopePatch, config: Any) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """(new config.rope_parameters, new max_position_embeddings, a record of what was done) for ``config``.

    Raises ValueError for a model that cannot take the patch (no RoPE, already scaled).
    """
    current = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in current and getattr(config, "rope_theta", None) is not None:
        current["rope_theta"] = config.rope_theta
    if "rope_theta" not in current:
        raise ValueError(f"{type(config).__name__} has no rope_theta: not a RoPE model this patch knows")
    kind = current.get("rope_type", current.get("type", "default"))
    if kind != "default":
        raise ValueError(f"the model's RoPE is already {kind!r} ({current}); extending a scaled RoPE again is not "
                         "supported: start from the unscaled model")
    original, factor = spec.resolve(config.max_position_embeddings)
    theta = float(current["rope_theta"])
    keep = {k: v for k, v in current.items() if k == "partial_rotary_factor"}
    dim = rotary_dim(config)
    new_max = int(round(original * factor))
    if spec.method == "linear":
        params = {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    elif spec.method == "ntk":
        params = {"rope_type": "default", "rope_theta": ntk_base(theta, factor, dim)}
    elif spec.method == "dynamic_ntk":
        params = {"rope_type": "dynamic", "rope_theta": theta, "factor": factor}
        new_max = original  # transformers and vLLM read it as the length where scaling starts
    else:
        params = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                  "original_max_position_embeddings": original,
                  "beta_fast": float(spec.beta_fast or 32.0), "beta_slow": float(spec.beta_slow or 1.0),
                  "attention_factor": 1.0 if spec.method == "ntk_by_parts" else float(
                      spec.attention_factor if spec.attention_factor is not None else yarn_attention_factor(factor))}
    params.update(keep)
    record = {"method": spec.method, "factor": factor, "original_max_position_embeddings": original,
              "original_rope_theta": theta, "max_position_embeddings": new_max,
              "target_length": int(round(original * factor))}
    return params, new_max, record


def _rotary_modules(model: Any) -> list[tuple[Any, str, Any]]:
    """(parent, attribute name, module) of every rotary embedding module in the model."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq"):
                found.append((parent, name, child))
    return found


def apply_rope(model: Any, spec: RopePatch, tokenizer: Any = None) -> dict[str, Any]:
    """Extend a loaded model's context in place (config, rotary module, tokenizer); returns a record.

    The rotary module is rebuilt by transformers from the new config. Its frequencies and
    attention factor must then equal ours (atol 1e-7), or this raises.
    """
    import torch

    config = model.config
    params, new_max, record = rope_parameters(spec, config)
    config.rope_parameters = params
    config.max_position_embeddings = new_max
    config.tunelab_rope = record  # saved with config.json: what was done, and from what
    modules = _rotary_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module to rebuild")
    dim = rotary_dim(config)
    expected, scale = scaled_inv_freq(spec.method, record["original_rope_theta"], dim, record["factor"],
                                      record["original_max_position_embeddings"], None, spec.beta_fast,
                                      spec.beta_slow, spec.attention_factor)
    for parent, name, old in modules:
        new = type(old)(config=config).to(old.inv_freq.device)
        setattr(parent, name, new)
        got = new.inv_freq.detach().float().cpu()
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0, atol=1e-7) or \
                abs(float(new.attention_scaling) - scale) > 1e-7:
            raise RuntimeError(f"{type(new).__name__} built from rope_parameters={params} rotates differently from "
                               f"tunelab's {spec.method} (max |Δθ| {float((got - expected).abs().max()):.3g}, "
                               f"attention factor {new.attention_scaling} vs {scale}): refusing to train on it")
    if tokenizer is not None:
        tokenizer.model_max_length = record["target_length"]
    return record


def rope_problems(spec: RopePatch, config: Any, where: str) -> list[Problem]:
    """Validate-time checks of a rope patch against the model's config (no weights)."""
    try:
        rope_parameters(spec, config)
    except ValueError as exc:
        return [Problem(where, str(exc))]
    return []


class Rope(Patch):
    """Extend the context of a RoPE model (PI, NTK-aware, dynamic NTK, NTK-by-parts, YaRN)."""

    name = "rope"
    config = RopePatch

    def check_config(self, spec: Any, config: Any, where: str) -> list[Problem]:
        return rope_problems(spec, config, where)

    def apply(self, model: Any, spec: Any, tokenizer: Any, where: str) -> dict[str, Any]:
        return apply_rope(model, spec, tokenizer)


def reset_dynamic_rope(model: Any) -> int:
    """Put every dynamic-NTK rotary module back to its unscaled frequencies; returns how many there were.

    transformers grows a dynamic rotary module's frequencies when a pass goes past its cached
    length and resets them only on a pass shorter than the original length, so a pass of
    exactly the original length (or between it and the longest one so far) after a longer one
    runs with the longer pass's frequencies. Evaluations call this before each independent
    pass, so every figure is that of its own length.
    """
    count = 0
    for _, _, module in _rotary_modules(model):
        if "dynamic" in str(getattr(module, "rope_type", "")) and hasattr(module, "original_inv_freq"):
            module.register_buffer("inv_freq", module.original_inv_freq.to(module.inv_freq.device), persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len
            count += 1
    return count
