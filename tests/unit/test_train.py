"""`tunelab train` (tunelab/train.py): what a rerun compares with the lock file."""


def test_rerunning_a_lock_whose_chat_template_differs_says_so(tmp_path, capsys):
    import yaml

    from tunelab.train import check_lock_data

    lock = tmp_path / "recipe.lock.yaml"
    lock.write_text(yaml.safe_dump({"model": {"path": "builtin:tiny-llama"},
                                    "tunelab_lock": {"chat_template": {"name": "qwen3", "sha256": "aaaa"}, "data": []}}))
    check_lock_data(lock, [], {"name": "qwen3", "sha256": "aaaa"})
    assert "chat template differs" not in capsys.readouterr().out
    check_lock_data(lock, [], {"name": "chatml", "sha256": "bbbb"})
    out = capsys.readouterr().out
    assert "chat template differs from the lock file's" in out and "qwen3" in out and "chatml" in out
