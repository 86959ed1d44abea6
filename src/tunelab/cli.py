"""The ``tunelab`` command line. Thin: parse, call one function, print.

Heavy libraries (torch, transformers, TRL) are imported inside the commands that need them,
so ``tunelab --help`` and recipe errors answer in well under two seconds. A user mistake
(UserError) prints its problems and exits 2; any other failure prints one line and exits 1
(set TUNELAB_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from tunelab.errors import Preempted, Problem, TrainingStopped, UserError

if TYPE_CHECKING:
    from pydantic import BaseModel


def block_options(block: type[BaseModel], skip: tuple[str, ...] = ("name",)) -> list[inspect.Parameter]:
    """Options for the fields of a recipe block: ``--kv-lora-rank`` for ``kv_lora_rank``, with its description as
    help and its default; the block itself checks the values (so they are reported as the recipe would be)."""
    params = []
    for name, field in block.model_fields.items():
        if name in skip:
            continue
        union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(field.annotation) if a is not type(None)] if union else [field.annotation]
        optional = union and type(None) in typing.get_args(field.annotation)
        core = args[0]
        choices = typing.get_args(core) if typing.get_origin(core) is typing.Literal else ()
        kind: Any = str if choices else core
        flag = "--" + name.replace("_", "-")
        help_ = (field.description or "") + (f" ({' | '.join(map(str, choices))})" if choices else "")
        option = typer.Option(f"{flag}/--no-{flag[2:]}" if kind is bool else flag, help=help_)
        default = ... if field.is_required() else field.default
        annotation = Annotated[Optional[kind] if optional else kind, option]  # type: ignore[valid-type]  # noqa: UP045
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def _convert_mla_command() -> Any:
    """``tunelab convert mla``: its options are the mla patch block's fields (a recipe's patches[].mla keys)."""
    from tunelab.patches.mla.block import MlaPatch

    def convert_mla(model: str, output: Path, device: str, **fields: Any) -> None:
        """Convert a Llama/Qwen2/Mistral model to multi-head latent attention (MLA) and save it."""
        from tunelab.convert import run_convert_mla

        _guard(run_convert_mla, model, output, device=device, **fields)

    fixed = [
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
            str, typer.Argument(help="model dir, run dir, hub id or builtin:tiny-*")]),
        inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            Path, typer.Option("-o", "--output", help="new folder for the converted model")]),
        inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=Annotated[
            str, typer.Option(help="auto (cuda when available) | cpu | cuda | cuda:N")]),
    ]
    params = fixed + block_options(MlaPatch)
    convert_mla.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    convert_mla.__annotations__ = {p.name: p.annotation for p in params}
    sub = typer.Typer()
    sub.command("mla")(convert_mla)
    return typer.main.get_command(sub)


class _ConvertGroup(TyperGroup):
    """``tunelab convert``: commands built when the group is used, from the patch blocks (importing those for every
    ``tunelab --help`` would add 0.1 s to it)."""

    def list_commands(self, ctx: Any) -> list[str]:
        return ["mla"]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        return _convert_mla_command() if cmd_name == "mla" else None


app = typer.Typer(help="Fine-tune language models from YAML recipes.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
recipes_app = typer.Typer(help="The shipped recipe library (list, show, copy) and the recipe schema.",
                          no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
convert_app = typer.Typer(cls=_ConvertGroup, help="Convert a model's architecture (mla: multi-head latent "
                          "attention).", no_args_is_help=True)
app.add_typer(convert_app, name="convert")
export_app = typer.Typer(help="Export a trained model: GGUF (llama.cpp, LM Studio), an Ollama model folder, or an "
                         "MLA-converted model as a DeepSeek-V3 checkpoint.",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")
runs_app = typer.Typer(help="The runs in a folder (ls) and how two runs differ (diff).", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a recipe key: dotted.key=value")]


def _fail(exc: BaseException) -> None:
    if isinstance(exc, UserError):
        typer.echo(exc.render(), err=True)
        raise typer.Exit(2)
    if isinstance(exc, Preempted):  # stopped at a checkpoint, to be run again
        typer.echo(str(exc), err=True)
        raise typer.Exit(exc.exit_code)
    if isinstance(exc, TrainingStopped):  # diverged, non-finite, degraded: its own exit code, no traceback
        typer.echo(f"error ({exc.status}): {exc}", err=True)
        raise typer.Exit(exc.exit_code)
    if os.environ.get("TUNELAB_DEBUG"):
        raise exc
    typer.echo(f"error: {type(exc).__name__}: {exc}\n(set TUNELAB_DEBUG=1 to see the traceback)", err=True)
    raise typer.Exit(1)


def _guard(fn, *args, **kwargs):  # noqa: ANN001, ANN202
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 -- the one place that turns errors into exit codes
        _fail(exc)


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help="recipe YAML (or a run's recipe.lock.yaml, or builtin:NAME)")],
    set_: SetOpt = None,
    resume: Annotated[Optional[str], typer.Option(help="auto (last complete checkpoint) or a checkpoint path")] = None,
) -> None:
    """Train a recipe: validate everything, then load the model and run."""
    from tunelab.train import run_training

    _guard(run_training, recipe, set_ or [], resume)


@app.command()
def validate(
    recipes: Annotated[list[str], typer.Argument(help="one or more recipe files")],
    set_: SetOpt = None,
    show_distributed: Annotated[Optional[int], typer.Option(
        "--show-distributed", help="also print the DeepSpeed JSON and accelerate YAML generated for N processes")] = None,
) -> None:
    """Check recipes (schema, data, TRL config) without loading any weights."""
    from tunelab.recipe.validate import validate as check

    failed = 0
    for path in recipes:
        try:
            resolved = check(path, set_ or [])
            for note in resolved.notes:
                typer.echo(f"  note: {note}")
            typer.echo(f"ok: {path}")
            if show_distributed is not None:
                _show_distributed(resolved.recipe, show_distributed)
        except UserError as exc:
            failed += 1
            typer.echo(exc.render(), err=True)
        except Exception as exc:  # noqa: BLE001
            _fail(exc)
    if failed:
        raise typer.Exit(2)


def _show_distributed(recipe, num_processes: int) -> None:  # noqa: ANN001
    """Print what the recipe's distributed: block generates: the DeepSpeed JSON (zero*) and the accelerate YAML."""
    import json

    import yaml

    from tunelab.distributed.config import accelerate_config, deepspeed_config, zero_stage

    if num_processes < 1:
        raise UserError(Problem("--show-distributed", "needs a process count of at least 1"))
    if zero_stage(recipe) is not None:
        typer.echo(f"# DeepSpeed JSON ({num_processes} processes)")
        typer.echo(json.dumps(deepspeed_config(recipe, num_processes), indent=2))
    typer.echo(f"# accelerate config ({num_processes} processes)")
    typer.echo(yaml.safe_dump(accelerate_config(recipe, num_processes), sort_keys=False).rstrip())


LONG = "Long context (--task passkey | ppl-vs-length | kv-cache)"
HARNESS = "lm-evaluation-harness (--task lm-eval:TASK[,TASK])"
TASKS = ("lm", "reward", "passkey", "ppl-vs-length", "kv-cache")
LM_EVAL = "lm-eval:"  # --task lm-eval:arc_easy,hellaswag: lm-evaluation-harness tasks
NO_DATA_TASKS = ("passkey", "kv-cache")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="model dir, run dir, adapter dir or builtin:tiny-*")],
    data: Annotated[Optional[str], typer.Option(help="data source (file, hub id or builtin:NAME); needed by every "
                                                "task but passkey and kv-cache")] = None,
    task: Annotated[str, typer.Option(help="lm: perplexity (and --generate); reward: pairwise accuracy of a "
                                      "reward model on preference pairs; passkey: passkey retrieval by length x "
                                      "depth; ppl-vs-length: sliding-window perplexity at several context "
                                      "lengths; kv-cache: KV-cache bytes per token, predicted (original vs MLA) "
                                      "and measured after generating; lm-eval:TASK[,TASK]: lm-evaluation-harness "
                                      "tasks (e.g. lm-eval:arc_easy,hellaswag)")] = "lm",
    format: Annotated[Optional[str], typer.Option(help="messages|sharegpt|alpaca|prompt_completion|text "
                                                  "(default: messages; ppl-vs-length: text)")] = None,
    max_length: Annotated[int, typer.Option()] = 1024,
    batch_size: Annotated[int, typer.Option()] = 8,
    limit: Annotated[Optional[int], typer.Option(help="only the first N rows (lm-eval: documents of each "
                                                 "task)")] = None,
    generate: Annotated[bool, typer.Option("--generate", help="also generate and score BLEU/ROUGE-L")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="tokens to generate (default: 64; passkey: 10)")] = None,
    temperature: Annotated[float, typer.Option()] = 0.0,
    top_p: Annotated[Optional[float], typer.Option()] = None,
    top_k: Annotated[Optional[int], typer.Option()] = None,
    num_beams: Annotated[int, typer.Option()] = 1,
    samples: Annotated[int, typer.Option(help="how many generations to print")] = 3,
    lengths: Annotated[Optional[str], typer.Option(help="context lengths in tokens, comma-separated "
                                                   "(default: passkey 256,512,1024; ppl-vs-length 128,256,512; "
                                                   "kv-cache 64,256)",
                                                   rich_help_panel=LONG)] = None,
    depths: Annotated[str, typer.Option(help="passkey: where the passkey sits in the filler, 0 (start) to 1 "
                                        "(end)", rich_help_panel=LONG)] = "0,0.25,0.5,0.75,1.0",
    trials: Annotated[int, typer.Option(help="passkey: passkeys per length x depth", rich_help_panel=LONG)] = 5,
    seed: Annotated[int, typer.Option(help="passkey: seed of the passkey draws", rich_help_panel=LONG)] = 42,
    stride: Annotated[Optional[int], typer.Option(help="ppl-vs-length: window step; only the last STRIDE tokens of "
                                                  "each window are scored (default: the length)",
                                                  rich_help_panel=LONG)] = None,
    max_tokens: Annotated[int, typer.Option(help="ppl-vs-length: read at most this many tokens of --data",
                                            rich_help_panel=LONG)] = 100_000,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="folder for the JSON and PNG "
                                                   "(default: MODEL-eval-TASK beside a local model, "
                                                   "else ./eval-TASK; TASK lm-eval for lm-eval tasks)",
                                                   rich_help_panel=LONG)] = None,
    lm_eval_include: Annotated[Optional[Path], typer.Option(
        "--lm-eval-include", help="a folder of lm-eval task YAMLs of your own, indexed besides lm-eval's (relative "
        "data_files in them are read relative to the YAML)", rich_help_panel=HARNESS)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="few-shot examples per prompt (default: each task's "
                                                       "own)", rich_help_panel=HARNESS)] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when available) | cpu | cuda | cuda:N",
                                        rich_help_panel=HARNESS)] = "auto",
) -> None:
    """Perplexity (--generate: BLEU/ROUGE-L), reward accuracy, passkey retrieval, ppl vs length, KV-cache size,
    lm-evaluation-harness tasks."""
    from tunelab.eval.commands import (
        run_eval,
        run_kv_cache_eval,
        run_lm_eval,
        run_passkey_eval,
        run_ppl_vs_length_eval,
        run_reward_eval,
    )

    if task.startswith(LM_EVAL):
        if data:
            _fail(UserError(Problem("--data", "lm-eval tasks read their own data", "drop --data; point a task at a "
                                    "local copy of its data instead (docs/evaluation.md)")))
        _guard(run_lm_eval, model, task[len(LM_EVAL) :], lm_eval_include, limit, batch_size, num_fewshot, device,
               output)
        return
    if lm_eval_include is not None:
        _fail(UserError(Problem("--lm-eval-include", f"is for --task {LM_EVAL}TASK, not --task {task}")))
    if task not in TASKS:
        _fail(UserError(Problem("--task", f"unknown task {task!r}", "use " + ", ".join(TASKS)
                                + f", or {LM_EVAL}TASK[,TASK] for lm-evaluation-harness tasks")))
    if task in NO_DATA_TASKS and data:
        _fail(UserError(Problem("--data", f"--task {task} does not read data", "it builds its own input; drop "
                                "--data")))
    if task == "passkey":
        _guard(run_passkey_eval, model, lengths, depths, trials, seed, output, max_new_tokens)
        return
    if task == "kv-cache":
        _guard(run_kv_cache_eval, model, lengths, output)
        return
    if not data:
        _fail(UserError(Problem("--data", f"--task {task} needs a data source", "pass --data FILE, a hub dataset "
                                "id or builtin:NAME")))
    if task == "ppl-vs-length":
        _guard(run_ppl_vs_length_eval, model, data, format or "text", lengths, stride, max_tokens, output)
        return
    if task == "reward":
        _guard(run_reward_eval, model, data, max_length, batch_size, limit)
        return
    gen = dict(max_new_tokens=max_new_tokens or 64, temperature=temperature, top_p=top_p, top_k=top_k,
               num_beams=num_beams)
    _guard(run_eval, model, data, format or "messages", max_length, batch_size, limit, gen if generate else None,
           samples)


@app.command("generate")
def generate_(
    model: Annotated[str, typer.Argument(help="model dir, run dir, adapter dir or builtin:tiny-*")],
    prompt: Annotated[str, typer.Argument(help="the user message")],
    system: Annotated[Optional[str], typer.Option(help="system message")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 128,
    temperature: Annotated[float, typer.Option()] = 0.0,
    top_p: Annotated[Optional[float], typer.Option()] = None,
    top_k: Annotated[Optional[int], typer.Option()] = None,
    num_beams: Annotated[int, typer.Option()] = 1,
) -> None:
    """Generate a reply to PROMPT through the model's chat template."""
    from tunelab.eval.commands import run_generate

    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, num_beams=num_beams)
    _guard(run_generate, model, prompt, system, gen)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="model dir, run dir, adapter dir or builtin:tiny-*")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface, needs --api-key)")] = \
        "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: a free one)")] = 8000,
    name: Annotated[Optional[str], typer.Option(help="model name in /v1/models and replies (default: the run's)")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="TUNELAB_API_KEY", show_default=False,
        help="clients must send 'Authorization: Bearer KEY'; required to listen beyond loopback. Prefer the "
             "environment variable: other users of the machine can read a command line")] = None,
) -> None:
    """Serve MODEL behind an OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions (streaming too)."""
    from tunelab.serve import run_serve

    _guard(run_serve, model, host, port, name, api_key)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="model dir, run dir, adapter dir or builtin:tiny-*")],
    system: Annotated[Optional[str], typer.Option(help="system message")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per reply")] = 256,
    temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
) -> None:
    """Chat with MODEL in the terminal, replies streamed; /reset clears the history, /exit or Ctrl-D quits."""
    from tunelab.serve import run_chat

    _guard(run_chat, model, system, max_new_tokens, temperature)


@app.command()
def merge(
    source: Annotated[str, typer.Argument(help="a run dir or a LoRA/DoRA adapter dir")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to save the merged model")],
) -> None:
    """Fold a LoRA/DoRA adapter into its base (W + B A * alpha / r) and save a standalone model."""
    from tunelab.models.inference import run_merge

    _guard(run_merge, source, output)


@export_app.command("deepseek")
def export_deepseek(
    model: Annotated[str, typer.Argument(help="an MLA-converted model dir or run dir (tunelab convert mla)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="new folder for the DeepSeek-V3 checkpoint")],
    rope_layout: Annotated[str, typer.Option(help="interleaved (DeepSeek-V3's own) | half-split")] = "interleaved",
) -> None:
    """Export an MLA-converted model as a stock DeepSeek-V3 checkpoint (plain transformers loads it)."""
    from tunelab.convert import run_export_deepseek

    _guard(run_export_deepseek, model, output, rope_layout)


@export_app.command("gguf")
def export_gguf(
    model: Annotated[str, typer.Argument(help="run dir, final/, LoRA/DoRA adapter dir (merged first), model dir or "
                                         "builtin:NAME")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the .gguf file to write")],
    type_: Annotated[str, typer.Option("--type", help="f16 | bf16 | q8_0 | f32 (1-D tensors stay f32)")] = "f16",
) -> None:
    """Write one GGUF file (llama.cpp, Ollama, LM Studio): merged weights, tokenizer, chat template, stop tokens."""
    from tunelab.models.gguf_export import run_export_gguf

    _guard(run_export_gguf, model, output, type_)


@export_app.command("ollama")
def export_ollama(
    model: Annotated[str, typer.Argument(help="run dir, final/, LoRA/DoRA adapter dir, model dir or builtin:NAME")],
    output: Annotated[Path, typer.Option("-o", "--output", help="new folder for model.gguf and Modelfile")],
    type_: Annotated[str, typer.Option("--type", help="f16 | bf16 | q8_0 | f32")] = "q8_0",
    name: Annotated[Optional[str], typer.Option(help="the name for `ollama create` (where ollama is installed)")] = None,
) -> None:
    """An Ollama model folder: the GGUF plus a Modelfile (TEMPLATE, SYSTEM, stops) of the training chat template."""
    from tunelab.models.ollama import run_export_ollama

    _guard(run_export_ollama, model, output, type_, name)


@app.command()
def report(run: Annotated[Path, typer.Argument(help="a run directory (train.output_dir)")]) -> None:
    """Write RUN/report.html: plots of every logged series, eval before -> after, data counts, the recipe lock."""
    from tunelab.report import write_report

    typer.echo(_guard(write_report, run))


@runs_app.command("ls")
def runs_ls(where: Annotated[Path, typer.Argument(help="the folder the runs are in")] = Path("runs")) -> None:
    """Runs with their method, base model, status, step and final metrics."""
    from rich.console import Console
    from rich.table import Table

    from tunelab.report import list_runs

    rows = _guard(list_runs, where)
    table = Table(*(rows[0].keys() if rows else ["run"]))
    for row in rows:
        table.add_row(*map(str, row.values()))
    Console().print(table)


@runs_app.command("diff")
def runs_diff(a: Annotated[Path, typer.Argument(help="a run directory")],
              b: Annotated[Path, typer.Argument(help="another run directory")]) -> None:
    """How two runs differ: resolved recipe, library versions, data fingerprints, final metrics (only what differs)."""
    from rich.console import Console
    from rich.table import Table

    from tunelab.report import diff_runs

    sections = _guard(diff_runs, a, b)
    console = Console()
    for title, rows in sections.items():
        if not rows:
            console.print(f"{title}: the same")
            continue
        table = Table("key", str(a), str(b), title=title)
        for key, x, y in rows:
            table.add_row(str(key), str(x), str(y))
        console.print(table)


@recipes_app.command("ls")
def recipes_ls() -> None:
    """List the shipped recipes."""
    from tunelab.recipe.library import list_recipes

    for name, summary in _guard(list_recipes):
        typer.echo(f"{name:40s} {summary}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="recipe name from `tunelab recipes ls`")]) -> None:
    """Print a shipped recipe."""
    from tunelab.recipe.load import resolve_builtin_recipe

    path = _guard(resolve_builtin_recipe, name)
    typer.echo(path.read_text(encoding="utf-8"), nl=False)


@recipes_app.command("cp")
def recipes_cp(
    name: Annotated[str, typer.Argument(help="recipe name from `tunelab recipes ls`")],
    dest: Annotated[Path, typer.Argument(help="file or directory to copy it to")],
) -> None:
    """Copy a shipped recipe to edit it (its extends: becomes builtin:... so it still resolves)."""
    from tunelab.recipe.library import copy_recipe

    out = _guard(copy_recipe, name, dest)
    typer.echo(f"copied to {out}")


@recipes_app.command("schema")
def recipes_schema() -> None:
    """Print the JSON Schema of a recipe file, for editors that validate and complete YAML (see the README)."""
    import json

    from tunelab.recipe.reference import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


LAUNCH = "Slurm (--slurm)"


@app.command()
def launch(
    recipe: Annotated[str, typer.Argument(help="recipe YAML (validated before anything starts)")],
    set_: SetOpt = None,
    resume: Annotated[Optional[str], typer.Option(help="passed to every rank's `tunelab train --resume`")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(help="processes per node (default: the GPUs here, "
                                                          "or 1 without CUDA)")] = None,
    nnodes: Annotated[int, typer.Option(help="nodes in the job")] = 1,
    node_rank: Annotated[Optional[int], typer.Option(help="this node's rank, 0..nnodes-1 (static rendezvous)")] = None,
    master_addr: Annotated[Optional[str], typer.Option(help="address of node 0, reachable from every node")] = None,
    master_port: Annotated[Optional[int], typer.Option(help="port on the master (default 29500)")] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(help="HOST:PORT of a c10d rendezvous (instead of "
                                                         "--master-addr/--node-rank)")] = None,
    rdzv_id: Annotated[str, typer.Option(help="job id shared by all nodes of a c10d rendezvous")] = "tunelab",
    rdzv_timeout: Annotated[int, typer.Option(help="seconds to wait for the master and the other nodes")] = 300,
    hostfile: Annotated[Optional[str], typer.Option(help="DeepSpeed-style hostfile ('HOST slots=N' lines): one "
                                                    "torchrun per host, over ssh unless the host is this one")] = None,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="KEY=VALUE exported to every rank")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the command per host, run nothing")] = False,
    slurm: Annotated[bool, typer.Option("--slurm", help="render an sbatch script instead of running",
                                        rich_help_panel=LAUNCH)] = False,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="write the sbatch script here "
                                                  "(default: stdout)", rich_help_panel=LAUNCH)] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option(help="GPUs of one compute node (default: "
                                                         "--nproc-per-node, else the GPUs here)",
                                                         rich_help_panel=LAUNCH)] = None,
    cpus_per_task: Annotated[Optional[int], typer.Option(help="CPUs per node task", rich_help_panel=LAUNCH)] = None,
    time: Annotated[Optional[str], typer.Option(help="time limit, e.g. 4:00:00", rich_help_panel=LAUNCH)] = None,
    partition: Annotated[Optional[str], typer.Option(rich_help_panel=LAUNCH)] = None,
    account: Annotated[Optional[str], typer.Option(rich_help_panel=LAUNCH)] = None,
    job_name: Annotated[str, typer.Option(rich_help_panel=LAUNCH)] = "tunelab",
    log: Annotated[str, typer.Option(help="sbatch --output", rich_help_panel=LAUNCH)] = "logs/%x-%j.out",
    hf_home: Annotated[Optional[str], typer.Option(help="HF_HOME on the nodes (shared cache)",
                                                   rich_help_panel=LAUNCH)] = None,
    setup: Annotated[Optional[list[str]], typer.Option(help="a shell line before srun (module load, source "
                                                       "venv/bin/activate); repeatable",
                                                       rich_help_panel=LAUNCH)] = None,
    signal_lead: Annotated[int, typer.Option(help="seconds before the time limit at which Slurm sends SIGTERM "
                                             "(the ranks checkpoint and stop); 0: no signal",
                                             rich_help_panel=LAUNCH)] = 120,
    requeue: Annotated[bool, typer.Option("--requeue/--no-requeue", help="requeue the job when it stopped at a "
                                          "checkpoint on SIGTERM (it then resumes with --resume auto)",
                                          rich_help_panel=LAUNCH)] = True,
) -> None:
    """Run a recipe on several processes or nodes with torchrun, or render a Slurm script."""
    from tunelab.launch.launcher import LaunchOptions, run_launch
    from tunelab.launch.torchrun import Rendezvous

    rdzv = Rendezvous(nproc_per_node=nproc_per_node or 1, nnodes=nnodes, node_rank=node_rank,
                      master_addr=master_addr, master_port=master_port, rdzv_endpoint=rdzv_endpoint,
                      rdzv_id=rdzv_id, rdzv_timeout_s=rdzv_timeout)
    opts = LaunchOptions(rdzv=rdzv, nproc_given=nproc_per_node is not None, hostfile=hostfile, slurm=slurm,
                         output=output, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time,
                         partition=partition, account=account, job_name=job_name, log=log, hf_home=hf_home,
                         env=env or [], setup=setup or [], dry_run=dry_run, signal_lead_s=signal_lead,
                         requeue=requeue)
    say = (lambda m: typer.echo(m)) if slurm or dry_run else (lambda m: typer.echo(m, err=True))
    code = _guard(run_launch, recipe, set_ or [], resume, opts, say)
    if code:
        raise typer.Exit(code)


@app.command()
def env() -> None:
    """Library versions and the devices torch sees."""
    from tunelab.recipe.lock import library_versions

    for k, v in library_versions().items():
        typer.echo(f"{k:14s} {v}")
    try:
        import torch

        typer.echo(f"{'cuda':14s} {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            typer.echo(f"  cuda:{i}      {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 "
                       f"{torch.cuda.is_bf16_supported()}")
        typer.echo(f"{'cpu threads':14s} {torch.get_num_threads()}")
    except ImportError:
        typer.echo("torch          not installed")


@app.command()
def plan(
    recipe: Annotated[str, typer.Argument(help="recipe YAML (or builtin:NAME)")],
    set_: SetOpt = None,
    gpus: Annotated[int, typer.Option(help="GPUs the run is spread over")] = 1,
    gpu_memory: Annotated[str, typer.Option(help="memory of one GPU, e.g. 80GB, 24GiB (GB = GiB = 2**30 bytes)")] = "80GB",
    seq_len: Annotated[Optional[int], typer.Option(help="tokens per row (default: data.max_length)")] = None,
    data: Annotated[bool, typer.Option("--data/--no-data", help="also the length histogram and the first example")] = True,
) -> None:
    """Per-GPU memory by strategy, the data's token lengths and the loss mask, without loading weights."""
    from tunelab.plan import run_plan

    for line in _guard(run_plan, recipe, set_ or [], gpus, gpu_memory, seq_len, sys.stdout.isatty(), data):
        typer.echo(line)


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on import about an optional CPU kernel package; it changes nothing here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        app()
    except UserError as exc:  # pragma: no cover - commands catch their own
        typer.echo(exc.render(), err=True)
        sys.exit(2)


__all__ = ["app", "main", "Problem"]
