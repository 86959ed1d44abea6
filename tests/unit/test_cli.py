"""The CLI itself (tunelab/cli.py): fast help, exit codes, options built from the recipe schema."""

import time


def test_help_is_fast_and_lists_commands(run_cli):
    start = time.perf_counter()
    rc, out, _ = run_cli("--help")
    assert time.perf_counter() - start < 2.0
    assert rc == 0
    for cmd in ("train", "validate", "eval", "generate", "merge", "recipes", "env", "convert", "export", "serve", "chat"):
        assert cmd in out


def test_user_errors_exit_2_runtime_errors_exit_1(run_cli, tmp_path):
    rc, _, err = run_cli("merge", tmp_path, "-o", tmp_path / "out")
    assert rc == 2 and "not a PEFT adapter" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    rc, _, err = run_cli("generate", broken, "hi")
    assert rc == 1 and "error:" in err and "Traceback" not in err


def test_convert_mla_options_are_the_patch_fields(run_cli):
    """`tunelab convert mla` has one option per mla patch field, with the field's description as its help."""
    from tunelab.patches.mla.block import MlaPatch

    code, out, err = run_cli("convert", "mla", "--help", env={"COLUMNS": "400"})
    assert code == 0, err
    for name, field in MlaPatch.model_fields.items():
        if name != "name":
            assert "--" + name.replace("_", "-") in out, name
            assert field.description.split(";")[0][:40] in out, name


def test_env_lists_installed_versions_and_devices(run_cli):
    """`tunelab env`: one line per library with the installed version (as pip sees it), then what torch sees."""
    import importlib.metadata
    import platform

    import torch

    rc, out, err = run_cli("env")
    assert rc == 0, err
    # "name           value": the name padded to 14 columns (names may hold a space: "cpu threads")
    lines = {line[:15].strip(): line[15:].strip() for line in out.splitlines() if line and not line.startswith(" ")}
    assert lines["python"] == platform.python_version()
    for name in ("tunelab", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers"):
        assert lines.get(name) == importlib.metadata.version(name), (name, out)
    assert lines["torch"] == torch.__version__  # the torch this interpreter imports is the one listed
    assert lines["cuda"] == f"{torch.cuda.is_available()} ({torch.cuda.device_count()} devices)"
    devices = [line for line in out.splitlines() if line.startswith("  cuda:")]
    assert len(devices) == torch.cuda.device_count()
    assert all("GiB, bf16" in line for line in devices)
    assert int(lines["cpu threads"]) >= 1
