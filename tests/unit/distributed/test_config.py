"""The DeepSpeed JSON and accelerate config generated from a recipe's distributed: block
(distributed/config.py; no torch needed)."""

import json

import pytest

from tunelab.distributed.config import accelerate_config, deepspeed_config, distributed_problems, find_auto
from tunelab.errors import RecipeError, UserError
from tunelab.recipe.load import load_recipe

SFT = "recipes/quickstart/sft.yaml"


def recipe(*sets: str, path: str = SFT):
    return load_recipe(path, list(sets)).recipe


def test_find_auto_is_recursive():
    assert find_auto({"a": "auto", "b": {"c": [1, {"d": "auto"}]}, "e": "autox"}) == ["a", "b.c[1].d"]


@pytest.mark.parametrize(("strategy", "offload", "stage"), [
    ("zero0", "none", 0), ("zero1", "none", 1), ("zero2", "none", 2), ("zero2", "cpu", 2),
    ("zero3", "none", 3), ("zero3", "cpu", 3), ("zero3", "nvme", 3)])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_generated_config_matches_recipe(strategy, offload, stage, precision):
    sets = [f"distributed.strategy={strategy}", f"distributed.offload={offload}", "train.batch_size=3",
            "train.grad_accum=5", "train.max_grad_norm=0.7", f"train.precision={precision}"]
    if offload == "nvme":
        sets.append("distributed.nvme_path=/local_nvme")
    config = deepspeed_config(recipe(*sets), world_size=4)
    assert find_auto(config) == []
    json.dumps(config)  # plain JSON
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 3 * 5 * 4
    assert config["gradient_clipping"] == 0.7
    assert config["bf16"]["enabled"] is (precision == "bf16")
    assert config["fp16"]["enabled"] is (precision == "fp16")
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    optimizer, param = zero.get("offload_optimizer"), zero.get("offload_param")
    if offload == "none":
        assert optimizer is None and param is None
    elif offload == "cpu":
        assert optimizer["device"] == "cpu"
        assert (param or {}).get("device") == ("cpu" if stage == 3 else None)  # params offload only in ZeRO-3
    else:
        assert optimizer == {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True}
        assert param["device"] == "nvme" and param["nvme_path"] == "/local_nvme"
    # final/ holds whole weights: ZeRO-3 gathers the shards at save
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)


def test_ppo_micro_batch_is_one_minibatch():
    r = recipe("distributed.strategy=zero2", "train.batch_size=8", "method.num_minibatches=2",
               path="recipes/quickstart/ppo.yaml")
    config = deepspeed_config(r, world_size=2)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 1, 8)


def test_user_json_auto_filled_and_kept(tmp_path):
    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_max_live_parameters": 12345,
                                  "stage3_gather_16bit_weights_on_model_save": "auto"},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto"}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    r = recipe("distributed.strategy=zero3", f"distributed.deepspeed_config={path}", "train.batch_size=2",
               "train.grad_accum=3", "train.precision=bf16", "train.learning_rate=0.001")
    config = deepspeed_config(r, world_size=2)
    assert find_auto(config) == []
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (2, 3, 12)
    assert config["bf16"]["enabled"] is True and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 12345  # the user's tuning stays
    assert "reduce_bucket_size" not in config["zero_optimization"]  # DeepSpeed's default, not a guess
    assert config["optimizer"]["params"] == {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert distributed_problems(r, 2)[0] == []


def test_user_json_conflicts_are_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 1.0,
                                "zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}))
    r = recipe("distributed.strategy=zero3", f"distributed.deepspeed_config={path}", "train.batch_size=4")
    problems, _ = distributed_problems(r, 2)
    text = "\n".join(map(str, problems))
    assert all(p.where == "distributed.deepspeed_config" for p in problems)
    assert "train_micro_batch_size_per_gpu = 16, but train.batch_size gives 4" in text
    assert "zero_optimization.stage = 2, but distributed.strategy gives 3" in text
    assert "scheduler" in text
    assert "gradient_clipping" not in text  # equal to the recipe's: no conflict
    with pytest.raises(RecipeError):
        deepspeed_config(r, 2)


def test_user_json_missing_or_broken(tmp_path):
    r = recipe("distributed.strategy=zero2", f"distributed.deepspeed_config={tmp_path / 'nope.json'}")
    assert "does not exist" in str(distributed_problems(r)[0][0])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = recipe("distributed.strategy=zero2", f"distributed.deepspeed_config={bad}")
    assert "not valid JSON" in str(distributed_problems(r)[0][0])


@pytest.mark.parametrize(("sets", "message"), [
    (["distributed.strategy=ddp", "distributed.offload=cpu"], "distributed.offload: cpu needs strategy zero2 or zero3"),
    (["distributed.strategy=zero1", "distributed.offload=cpu"], "distributed.offload: cpu needs strategy zero2"),
    (["distributed.strategy=zero2", "distributed.offload=nvme", "distributed.nvme_path=/x"],
     "distributed.offload: nvme needs strategy zero3"),
    (["distributed.strategy=zero3", "distributed.offload=nvme"], "distributed.nvme_path: offload: nvme needs"),
    (["distributed.strategy=zero3", "distributed.nvme_path=/x"], "distributed.nvme_path: is only used with"),
    (["distributed.strategy=fsdp2", "distributed.deepspeed_config=ds.json"],
     "distributed.deepspeed_config: a DeepSpeed JSON needs strategy zero0..zero3"),
    (["distributed.strategy=fsdp2", "distributed.offload=cpu"], "distributed.fsdp.cpu_offload: true"),
    (["distributed.strategy=zero2", "distributed.fsdp.cpu_offload=true"], "distributed.fsdp: options only"),
    (["distributed.strategy=zero4"], "distributed.strategy"),
])
def test_schema_errors_name_the_key(sets, message):
    with pytest.raises(UserError) as exc:
        recipe(*sets)
    assert message in exc.value.render()


def test_accelerate_config():
    r = recipe("distributed.strategy=zero3", "distributed.offload=cpu", "train.precision=bf16", "train.grad_accum=2")
    cfg = accelerate_config(r, num_processes=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
                            main_process_port=29500)
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["mixed_precision"] == "bf16"
    assert (cfg["num_processes"], cfg["num_machines"], cfg["machine_rank"]) == (8, 2, 1)
    assert (cfg["main_process_ip"], cfg["main_process_port"]) == ("10.0.0.1", 29500)
    ds = cfg["deepspeed_config"]
    assert (ds["zero_stage"], ds["gradient_accumulation_steps"], ds["offload_param_device"]) == (3, 2, "cpu")
    assert ds["zero3_save_16bit_model"] is True and ds["deepspeed_multinode_launcher"] == "standard"
    assert find_auto(cfg) == []
    fsdp = accelerate_config(recipe("distributed.strategy=fsdp2", "distributed.fsdp.cpu_offload=true"), 2)
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_offload_params"] is True
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert accelerate_config(recipe("distributed.strategy=ddp"), 2)["distributed_type"] == "MULTI_GPU"
    assert accelerate_config(recipe(), 1)["distributed_type"] == "NO"
    with_file = accelerate_config(recipe("distributed.strategy=zero2"), 2, deepspeed_config_file="/tmp/ds.json")
    assert with_file["deepspeed_config"] == {"deepspeed_config_file": "/tmp/ds.json", "zero3_init_flag": False}


# -------------------------------------------- the generated JSON as DeepSpeed and transformers read it

# every strategy x offload the recipe schema accepts (test_schema_errors_name_the_key: cpu needs zero2/3, nvme zero3)
DS_CASES = [("zero0", "none"), ("zero1", "none"), ("zero2", "none"), ("zero2", "cpu"), ("zero3", "none"),
            ("zero3", "cpu"), ("zero3", "nvme")]


def parsed_by_deepspeed(config: dict, world_size: int):
    """DeepSpeed's own config object of ``config`` (what deepspeed.initialize builds), at ``world_size`` ranks.

    Without a process group DeepSpeedConfig takes world size 1 and checks train_batch_size against it: the
    world size is given to it the way an initialised group would.
    """
    import copy
    from unittest import mock

    ds_config = pytest.importorskip("deepspeed.runtime.config")
    with mock.patch.object(ds_config.dist, "get_world_size", return_value=world_size), \
            mock.patch.object(ds_config.dist, "get_rank", return_value=0):
        return ds_config.DeepSpeedConfig(copy.deepcopy(config))


@pytest.mark.parametrize(("strategy", "offload"), DS_CASES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_parses_the_generated_config(strategy, offload, precision):
    """DeepSpeed's pydantic models (extra keys forbidden) accept the JSON, and read back what the recipe says."""
    sets = [f"distributed.strategy={strategy}", f"distributed.offload={offload}", "train.batch_size=3",
            "train.grad_accum=5", "train.max_grad_norm=0.7", f"train.precision={precision}"]
    if offload == "nvme":
        sets.append("distributed.nvme_path=/local_nvme")
    config = deepspeed_config(recipe(*sets), world_size=4)
    ds = parsed_by_deepspeed(config, world_size=4)
    assert ds.world_size == 4
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (3, 5, 60)
    assert ds.gradient_clipping == 0.7
    assert ds.bfloat16_config.enabled is (precision == "bf16")
    assert ds.float16_config.enabled is (precision == "fp16")
    if precision == "fp16":  # dynamic loss scaling from 2**16
        assert (ds.float16_config.loss_scale, ds.float16_config.initial_scale_power) == (0, 16)
    zero = ds.zero_config
    stage = int(strategy[-1])
    assert ds.zero_optimization_stage == zero.stage == stage
    assert ds.zero_enabled is (stage > 0)
    if stage >= 2:
        assert zero.overlap_comm is False and zero.contiguous_gradients is True
    assert zero.gather_16bit_weights_on_model_save is (stage == 3)
    optimizer, param = zero.offload_optimizer, zero.offload_param
    if offload == "none":
        assert optimizer is None and param is None
        assert (ds.zero_force_ds_cpu_optimizer, ds.zero_allow_untested_optimizer) == (True, False)  # DeepSpeed's
    else:
        assert optimizer.device == offload and optimizer.pin_memory is True
        if stage == 3:
            assert param.device == offload and param.pin_memory is True
        else:
            assert param is None
        if offload == "nvme":
            assert str(optimizer.nvme_path) == str(param.nvme_path) == "/local_nvme"
        # train.optim steps on the CPU: DeepSpeed must neither swap in DeepSpeedCPUAdam nor refuse a torch optimizer
        assert (ds.zero_force_ds_cpu_optimizer, ds.zero_allow_untested_optimizer) == (False, True)
    # the buckets are DeepSpeed's defaults: none of ours is "auto" (there is no model here to size them from)
    assert zero.reduce_bucket_size == zero.allgather_bucket_size == 500_000_000
    assert ds.steps_per_print == 1_000_000_000 and ds.wall_clock_breakdown is False


def test_deepspeed_rejects_a_wrong_config():
    """The parse is strict: what the test above accepts is not accepted because anything goes."""
    config = deepspeed_config(recipe("distributed.strategy=zero2"), world_size=2)
    with pytest.raises(Exception, match="contiguous_gradient"):  # a misspelt ZeRO key
        bad = json.loads(json.dumps(config))
        bad["zero_optimization"]["contiguous_gradient"] = bad["zero_optimization"].pop("contiguous_gradients")
        parsed_by_deepspeed(bad, 2)
    with pytest.raises(AssertionError, match="Check batch related parameters"):  # the batch at another world size
        parsed_by_deepspeed(config, 4)


def test_deepspeed_parses_a_merged_user_config(tmp_path):
    """A user's JSON, its "auto" values filled from the recipe (test_user_json_auto_filled_and_kept), is one
    DeepSpeed accepts, with the user's own tuning read back."""
    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_max_live_parameters": 12345, "offload_optimizer": {"device": "cpu"},
                                  "stage3_gather_16bit_weights_on_model_save": "auto"},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto"}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    r = recipe("distributed.strategy=zero3", f"distributed.deepspeed_config={path}", "train.batch_size=2",
               "train.grad_accum=3", "train.precision=bf16", "train.learning_rate=0.001")
    ds = parsed_by_deepspeed(deepspeed_config(r, world_size=2), world_size=2)
    assert (ds.train_batch_size, ds.zero_optimization_stage, ds.bfloat16_config.enabled) == (12, 3, True)
    assert ds.zero_config.max_live_parameters == 12345
    assert ds.zero_config.offload_optimizer.device == "cpu" and ds.zero_config.offload_param is None
    assert ds.zero_config.gather_16bit_weights_on_model_save is True
    assert ds.optimizer_name == "adamw" and ds.optimizer_params["lr"] == 0.001
    assert ds.zero_config.prefetch_bucket_size == 50_000_000  # "auto" -> DeepSpeed's default


@pytest.mark.parametrize(("strategy", "offload"), DS_CASES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_transformers_accepts_the_generated_config_with_our_training_arguments(monkeypatch, strategy, offload,
                                                                               precision):
    """transformers checks the DeepSpeed JSON against TrainingArguments (HfTrainerDeepSpeedConfig: batch sizes,
    accumulation, clipping, precision must match, else the Trainer stops): the JSON and the arguments that
    methods/common.py builds from the same recipe agree, at the launcher's world size.

    The arguments are a plain namespace of training_arguments()' values: a real TrainingArguments with a
    DeepSpeed config forms a process group when asked for its world size.
    """
    from types import SimpleNamespace

    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from tunelab.methods.common import training_arguments

    monkeypatch.setenv("WORLD_SIZE", "2")
    sets = [f"distributed.strategy={strategy}", f"distributed.offload={offload}", "train.batch_size=3",
            "train.grad_accum=5", "train.max_grad_norm=0.7", f"train.precision={precision}", "train.weight_decay=0.01"]
    if offload == "nvme":
        sets.append("distributed.nvme_path=/local_nvme")
    targs = training_arguments(recipe(*sets))
    args = SimpleNamespace(world_size=2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, save_on_each_node=False,
                           fp16_full_eval=False, bf16_full_eval=False, get_warmup_steps=lambda steps: 0,
                           **{k: targs[k] for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                    "max_grad_norm", "learning_rate", "weight_decay", "fp16", "bf16")})
    hf = HfTrainerDeepSpeedConfig(targs["deepspeed"])
    try:  # the object registers itself globally (is_deepspeed_zero3_enabled): never left behind for other tests
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, model=None, num_training_steps=10)  # raises on any mismatch
        assert hf.mismatches == []
        assert hf.is_zero3() is (strategy == "zero3")
        assert hf.is_offload() is (offload != "none")
        assert str(hf.dtype()) == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
        assert find_auto(hf.config) == []
        ds = parsed_by_deepspeed(hf.config, world_size=2)  # and DeepSpeed still reads it after transformers
        assert ds.zero_optimization_stage == int(strategy[-1])
    finally:
        unset_hf_deepspeed_config()
