"""The DeepSpeed JSON and the accelerate config of a recipe, generated from its ``distributed:`` and ``train:``.

One source of truth: micro batch (``train.batch_size``), gradient accumulation (``train.grad_accum``),
precision (``train.precision``, auto = bf16 on a GPU that has it, fp32 on a CPU), clipping
(``train.max_grad_norm``), ZeRO stage and offload all come from the recipe, so the launcher, the
HF/TRL trainers and our PPO trainer read the same numbers, and nothing is left ``auto`` for DeepSpeed
or transformers to guess later. A user's own DeepSpeed JSON is accepted: its ``auto`` values are
filled the same way, and a value that contradicts the recipe is an error that names both.

No torch import at module level (``tunelab validate`` answers in seconds); resolving ``precision:
auto`` imports torch only to ask whether CUDA is there.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tunelab.errors import Problem, RecipeError
from tunelab.specs import ZERO_STAGES, RecipeSpec


DEEPSPEED_KEY = "distributed.deepspeed_config"
# sized by transformers from the model's hidden size when "auto"; without the model, DeepSpeed's defaults
BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
               "stage3_param_persistence_threshold")


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on a GPU that supports it, else fp32 (CPU bf16 autocast is slow and lossy)."""
    if precision != "auto":
        return precision
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
    except ImportError:  # pragma: no cover
        pass
    return "fp32"


def precision_of(recipe: "RecipeSpec") -> str:
    """fp32|bf16|fp16: ``train.precision`` resolved on this machine, as training resolves it."""
    return resolve_precision(recipe.train.precision)


def zero_stage(recipe: "RecipeSpec") -> int | None:
    """The ZeRO stage of the recipe's strategy, or None when it is not a DeepSpeed strategy."""
    return ZERO_STAGES.get(recipe.distributed.strategy)


def micro_batch_and_accumulation(recipe: "RecipeSpec") -> tuple[int, int]:
    """(micro batch per process, accumulation steps) as the engine sees them: the method block's rule.

    (PPO, our trainer, steps the optimizer once per minibatch of a rollout: its micro batch is
    ``batch_size / num_minibatches`` and it accumulates nothing.)
    """
    return recipe.method.micro_batch(recipe.train)


def generated_deepspeed_config(recipe: "RecipeSpec", world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON tunelab writes for a zero* strategy (no user JSON)."""
    d = recipe.distributed
    stage = zero_stage(recipe)
    if stage is None:
        raise ValueError(f"distributed.strategy {d.strategy!r} is not a DeepSpeed ZeRO strategy")
    micro, accum = micro_batch_and_accumulation(recipe)
    precision = precision_of(recipe)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if stage == 3:
        # final/ holds whole HF weights: gather the shards at save (16-bit, or fp32 when training in fp32)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if d.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif d.offload == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": d.nvme_path, "pin_memory": True}
        zero["offload_param"] = {"device": "nvme", "nvme_path": d.nvme_path, "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": recipe.train.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # tunelab logs; DeepSpeed's own step prints are noise
        "wall_clock_breakdown": False,
    }
    if d.offload != "none":
        # the optimizer is train.optim (a torch optimizer, stepped on the CPU), not DeepSpeedCPUAdam,
        # whose C++ op would have to be compiled on every machine
        config["zero_force_ds_cpu_optimizer"] = False
        config["zero_allow_untested_optimizer"] = True
    return config


def find_auto(value: Any, where: str = "") -> list[str]:
    """Dotted paths of every ``"auto"`` left anywhere in a nested JSON value."""
    if isinstance(value, str):
        return [where] if value == "auto" else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in find_auto(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in find_auto(v, f"{where}[{i}]")]
    return []


def read_user_deepspeed_config(path: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The user's DeepSpeed JSON as a dict, or the problem with reading it."""
    file = Path(path)
    if not file.is_file():
        return None, [Problem(DEEPSPEED_KEY, f"{path} does not exist", "give the path of a DeepSpeed JSON "
                              "(relative to the directory you run from), or remove the key to have one generated")]
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [Problem(DEEPSPEED_KEY, f"{path} is not valid JSON: {exc}")]
    if not isinstance(data, dict):
        return None, [Problem(DEEPSPEED_KEY, f"{path} holds a {type(data).__name__}, not a JSON object")]
    return data, []


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return a == b


def merge_user_deepspeed_config(user: dict[str, Any], recipe: "RecipeSpec", world_size: int,
                                path: str = "") -> tuple[dict[str, Any], list[Problem], list[str]]:
    """(filled config, conflicts, notes): the user's JSON with every ``auto`` and recipe-owned key filled in.

    A key the recipe decides (batch sizes, accumulation, clipping, precision, ZeRO stage, offload
    when the recipe sets one) may be absent, ``auto`` or equal to the recipe's value; anything
    else is a conflict. Other keys are the user's to tune and are kept as written.
    """
    ours = generated_deepspeed_config(recipe, world_size)
    config = copy.deepcopy(user)
    problems: list[Problem] = []
    notes: list[str] = []
    name = path or "the DeepSpeed JSON"
    micro, accum = micro_batch_and_accumulation(recipe)
    owned = {
        "train_micro_batch_size_per_gpu": ("train.batch_size", micro),
        "gradient_accumulation_steps": ("train.grad_accum", accum),
        "train_batch_size": (f"train.batch_size x train.grad_accum x {world_size} processes", micro * accum * world_size),
        "gradient_clipping": ("train.max_grad_norm", recipe.train.max_grad_norm),
        "bf16.enabled": ("train.precision", ours["bf16"]["enabled"]),
        "fp16.enabled": ("train.precision", ours["fp16"]["enabled"]),
        "zero_optimization.stage": ("distributed.strategy", ours["zero_optimization"]["stage"]),
    }
    if "bfloat16" in config and "bf16" not in config:  # DeepSpeed's older spelling of the bf16 block
        config["bf16"] = config.pop("bfloat16")
    zero_ours = ours["zero_optimization"]
    if zero_ours["stage"] == 3:
        owned["zero_optimization.stage3_gather_16bit_weights_on_model_save"] = (
            "final/ (whole HF weights are written at the end)", True)
    if recipe.distributed.offload != "none":
        for block in ("offload_optimizer", "offload_param"):
            if block in zero_ours:
                owned[f"zero_optimization.{block}.device"] = ("distributed.offload", zero_ours[block]["device"])
                if "nvme_path" in zero_ours[block]:
                    owned[f"zero_optimization.{block}.nvme_path"] = ("distributed.nvme_path", recipe.distributed.nvme_path)
    for key, (recipe_key, want) in owned.items():
        have = _get(config, key)
        if have is None or have == "auto":
            _set(config, key, want)
        elif not _same(have, want):
            problems.append(Problem(DEEPSPEED_KEY, f"{name} sets {key} = {have!r}, but {recipe_key} gives {want!r}",
                                    f"set it to \"auto\" (or remove it) so that the recipe decides, or change {recipe_key}"))
    for block in ("offload_optimizer", "offload_param"):
        device = _get(config, f"zero_optimization.{block}.device")
        if device not in (None, "none") and recipe.distributed.offload == "none":
            notes.append(f"{name}: zero_optimization.{block} offloads to {device} (the recipe's distributed.offload "
                         "is none; the JSON decides)")
            if "optimizer" not in config:
                config.setdefault("zero_force_ds_cpu_optimizer", False)
                config.setdefault("zero_allow_untested_optimizer", True)
    if recipe.distributed.offload != "none" and "optimizer" not in config:
        config.setdefault("zero_force_ds_cpu_optimizer", False)
        config.setdefault("zero_allow_untested_optimizer", True)
    zero = config.get("zero_optimization", {})
    for key in BUCKET_KEYS:
        if zero.get(key) == "auto":
            del zero[key]
            notes.append(f"{name}: zero_optimization.{key} auto -> DeepSpeed's default (the model is not loaded yet)")
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict):
        params = optimizer.setdefault("params", {})
        fills = {"lr": ("train.learning_rate", recipe.train.learning_rate),
                 "weight_decay": ("train.weight_decay", recipe.train.weight_decay)}
        for key, (recipe_key, want) in fills.items():
            have = params.get(key)
            if have is None or have == "auto":
                params[key] = want
            elif not _same(have, want):
                problems.append(Problem(DEEPSPEED_KEY, f"{name} sets optimizer.params.{key} = {have!r}, but "
                                        f"{recipe_key} gives {want!r}", "set it to \"auto\" or change the recipe"))
        if params.get("betas") == "auto":
            params["betas"] = [0.9, 0.999]
        if params.get("eps") == "auto":
            params["eps"] = 1e-8
        notes.append(f"{name}: the optimizer is DeepSpeed's {optimizer.get('type')!r}, not train.optim")
    if "scheduler" in config:
        problems.append(Problem(DEEPSPEED_KEY, f"{name} has a scheduler block",
                                "remove it: the schedule comes from train.lr_scheduler and train.warmup_ratio"))
    if not problems:
        for left in find_auto(config):
            problems.append(Problem(DEEPSPEED_KEY, f"{name} leaves {left} = \"auto\" and tunelab has no value for it",
                                    "give it a number"))
    return config, problems, notes


def deepspeed_config_with_notes(recipe: "RecipeSpec", world_size: int) -> tuple[dict[str, Any], list[str]]:
    """(DeepSpeed JSON, notes) for a zero* strategy; RecipeError if the user's JSON cannot be used."""
    path = recipe.distributed.deepspeed_config
    if not path:
        return generated_deepspeed_config(recipe, world_size), []
    user, problems = read_user_deepspeed_config(path)
    if user is None:
        raise RecipeError(problems)
    config, problems, notes = merge_user_deepspeed_config(user, recipe, world_size, path)
    if problems:
        raise RecipeError(problems, title=f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
    return config, notes


def deepspeed_config(recipe: "RecipeSpec", world_size: int) -> dict[str, Any]:
    """The complete DeepSpeed JSON of a zero* recipe at ``world_size`` processes: nothing left ``auto``."""
    return deepspeed_config_with_notes(recipe, world_size)[0]


def fsdp_config(recipe: "RecipeSpec") -> dict[str, Any]:
    """TrainingArguments.fsdp_config for strategy fsdp2 (keys without the ``fsdp_`` prefix)."""
    f = recipe.distributed.fsdp
    return {
        "version": 2,
        "reshard_after_forward": f.reshard_after_forward,
        "cpu_offload": f.cpu_offload,
        "cpu_ram_efficient_loading": f.cpu_ram_efficient_loading,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",  # final/ holds whole HF weights
        "activation_checkpointing": recipe.model.gradient_checkpointing,
    }


def accelerate_config(recipe: "RecipeSpec", num_processes: int, num_machines: int = 1, machine_rank: int = 0,
                      main_process_ip: str | None = None, main_process_port: int | None = None,
                      deepspeed_config_file: str | None = None) -> dict[str, Any]:
    """The accelerate config (what ``accelerate launch --config_file`` reads as YAML) of a recipe.

    ``num_processes`` is the total over all machines, as accelerate counts it. DDP is written as
    MULTI_GPU (accelerate's torchrun path); on a machine without CUDA tunelab forms a gloo group
    itself. ``deepspeed_config_file``: where the caller wrote :func:`deepspeed_config`'s JSON;
    without it the ZeRO settings are inlined (accelerate allows one or the other).
    """
    d = recipe.distributed
    precision = precision_of(recipe)
    stage = zero_stage(recipe)
    out: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "debug": False}
    if stage is not None:
        out["distributed_type"] = "DEEPSPEED"
        if deepspeed_config_file:
            ds: dict[str, Any] = {"deepspeed_config_file": deepspeed_config_file, "zero3_init_flag": stage == 3}
        else:
            full = deepspeed_config(recipe, max(1, num_processes))
            zero = full["zero_optimization"]
            ds = {"zero_stage": stage,
                  "gradient_accumulation_steps": full["gradient_accumulation_steps"],
                  "gradient_clipping": full["gradient_clipping"],
                  "offload_optimizer_device": zero.get("offload_optimizer", {}).get("device", "none"),
                  "offload_param_device": zero.get("offload_param", {}).get("device", "none"),
                  "zero3_init_flag": stage == 3,
                  "zero3_save_16bit_model": stage == 3}
            if d.offload == "nvme":
                ds["offload_optimizer_nvme_path"] = d.nvme_path
                ds["offload_param_nvme_path"] = d.nvme_path
        if num_machines > 1:
            ds["deepspeed_multinode_launcher"] = "standard"  # torchrun-style rendezvous, no pdsh
        out["deepspeed_config"] = ds
    elif d.strategy == "fsdp2":
        f = fsdp_config(recipe)
        out["distributed_type"] = "FSDP"
        out["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": f["auto_wrap_policy"],
            "fsdp_reshard_after_forward": f["reshard_after_forward"],
            "fsdp_offload_params": f["cpu_offload"],
            "fsdp_cpu_ram_efficient_loading": f["cpu_ram_efficient_loading"],
            "fsdp_state_dict_type": f["state_dict_type"],
            "fsdp_activation_checkpointing": f["activation_checkpointing"],
        }
    else:
        out["distributed_type"] = "MULTI_GPU" if num_processes > 1 else "NO"
    out.update(
        mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"),
        num_processes=num_processes,
        num_machines=num_machines,
        machine_rank=machine_rank,
        rdzv_backend="static",
        same_network=True,
        use_cpu=False,
        downcast_bf16="no",
        dynamo_config={},
    )
    if main_process_ip is not None:
        out["main_process_ip"] = main_process_ip
    if main_process_port is not None:
        out["main_process_port"] = main_process_port
    return out


def distributed_problems(recipe: "RecipeSpec", world_size: int = 1) -> tuple[list[Problem], list[str]]:
    """What ``tunelab validate`` reports about the ``distributed:`` block before any weights load."""
    notes: list[str] = []
    if zero_stage(recipe) is not None:
        try:
            config, notes = deepspeed_config_with_notes(recipe, world_size)
        except RecipeError as exc:
            return exc.problems, []
        left = find_auto(config)
        if left:
            return [Problem(DEEPSPEED_KEY, f"\"auto\" left at {', '.join(left)}")], notes
    if recipe.distributed.strategy == "fsdp2":
        notes.append("distributed.strategy fsdp2 runs on GPUs only (accelerate does not shard CPU processes with FSDP); "
                     "on a machine without CUDA `tunelab train` stops before loading weights")
    return [], notes
