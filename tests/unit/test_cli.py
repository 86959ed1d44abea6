"""The CLI itself (tunelab/cli.py): fast help, exit codes, options built from the recipe schema."""

import time


def test_help_is_fast_and_lists_commands(run_cli):
    start = time.perf_counter()
    rc, out, _ = run_cli("--help")
    assert time.perf_counter() - start < 2.0
    assert rc == 0
    for cmd in ("train", "validate", "eval", "generate", "merge", "recipes", "env", "convert", "export"):
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
