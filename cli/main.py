"""The `gradstore` command line: thin click commands over the gradstore and qless libraries.

Each command opens the store, calls one library function and formats what it returns;
library errors become `Error: ...` with exit status 1, usage errors exit 2.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os

import click

import gradstore
from gradstore.query import compose
from gradstore.query.planner import Plan
from gradstore.sharded import MANIFEST, read_manifest
from qless.config import (  # torch-free: the engine install has it
    PROJECTIONS,
    STAGE_CHAT_FORMATS,
    WARMUP_PERCENTAGE,
    ConfigError,
    EvalConfig,
    IngestConfig,
    LoraConfig,
    ReadConfig,
    WarmupConfig,
)

from .output import emit, note, output_options, silent_option, store_option
from .params import (
    CONDITION,
    ENCODING,
    ENCODINGS,
    FLOATS,
    NAME,
    NAMES,
    SELECTION_SIZE,
    SHARD,
    requires,
)


def handle_errors(fn):
    """Map the libraries' named errors to click's one-line `Error: ...` (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (gradstore.GradstoreError, ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(gradstore.__version__, prog_name="gradstore")
def cli() -> None:
    """gradstore: select training data by gradient similarity (LESS / QLESS).

    Example:

        gradstore query --task mmlu --k 5%
    """


@cli.command()
@click.argument("query_text", required=False, metavar="[QUERY]")
@click.option("--task", "-t", "tasks", multiple=True, type=NAME, help="Target task set (repeatable).")
@click.option("--k", "k", default="5%", show_default=True, type=SELECTION_SIZE,
              help="How many to select: a count or a percentage.")
@click.option("--set", "set_name", type=NAME, help="Training set to select from (default: the store's only one).")
@click.option("--encoding", type=ENCODING, help="Encoding to score with (default: chosen by the planner).")
@click.option("--mode", type=click.Choice(["symmetric", "asymmetric"]), help="Quantize the task side too?")
@click.option("--rerank", type=ENCODING,
              help="Rescore a shortlist in this encoding (default plan: absmax8 after sign1-centered).")
@click.option("--oversample", type=click.FloatRange(1, 10**6), help="Shortlist size over k (with --rerank).")
@click.option("--agg", type=click.Choice(["max", "mean"]), help="Across subtasks (LESS: max, QLESS: mean).")
@click.option("--combine", type=click.Choice(["mean", "max", "sum"]), help="Across several tasks.")
@click.option("--checkpoints", type=NAMES, help="Comma-separated checkpoint names (default: all).")
@click.option("--weight", type=click.Choice(["lr", "uniform"]), help="Checkpoint weights.")
@click.option("--where", type=CONDITION, help="Filter on row metadata, e.g. \"source = 'dolly'\".")
@click.option("--explain", is_flag=True, help="Print the plan; do not scan.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the selected source records here (JSONL).")
@click.option("--ray/--local", "use_ray", default=False,
              help="With a shard manifest: scan each shard on a Ray actor, or on threads here (default).")
@store_option(manifest=True)
@output_options
@silent_option
@handle_errors
def query(query_text, tasks, k, set_name, encoding, mode, rerank, oversample, agg, combine, checkpoints,
          weight, where, explain, out, use_ray, store_path, fmt, silent):
    """Select the training rows that help a task most.

    Either flags (compiled to the query language) or one QUERY string; see docs/query.md.
    `--store` may name a shard manifest: the shards are queried in place, as one merged store.

    Example:

        gradstore query --task mmlu --k 5%

        gradstore query "TOP 1000 FROM train BY mmlu, bbh WHERE source = 'dolly'" --table

        gradstore query --store shards.json --task mmlu --k 5% --ray --out selected.jsonl
    """
    if oversample is not None and not rerank:
        raise click.UsageError("--oversample sizes the shortlist of --rerank; give --rerank too")
    sharded = os.path.isfile(store_path)
    if use_ray and not sharded:
        raise click.UsageError("--ray runs the shards of a manifest; --store names a store directory")
    flags = dict(set_name=set_name, encoding=encoding, mode=mode, agg=agg, combine=combine,
                 checkpoints=checkpoints, weight=weight, where=where, rerank=rerank, oversample=oversample)
    if query_text and (tasks or any(flags.values())):
        raise click.UsageError("give either a QUERY string or --task and other flags, not both")
    if not query_text and not tasks:
        raise click.UsageError("give a QUERY string or at least one --task")
    with gradstore.open_sharded(store_path, ray=use_ray) if sharded else gradstore.open(store_path) as store:
        text = query_text or compose(store, tasks, k, **flags)
        if explain and not text.lstrip().upper().startswith("EXPLAIN"):
            text = "EXPLAIN " + text
        result = store.query(text)
        if isinstance(result, Plan):
            click.echo(str(result))
            return
        for line in result.plan.notes:
            note(line, silent)
        note(f"{len(result)} rows selected by: {result.plan.query.to_text()}", silent)
        emit(result.to_dicts(), fmt, ["rank", "id", "score", "source", "category", "subtask"]
             if fmt == "table" else None)
        if out:
            from qless.selection import write_selected

            n = write_selected(result.records, out)
            note(f"wrote {n} source records to {out}", silent)


@cli.command()
@store_option()
@output_options
@handle_errors
def info(store_path, fmt):
    """Describe a store: sets, rows, subtasks, checkpoints, encodings and their bytes.

    Example:

        gradstore info --store ./gradstore --table
    """
    with gradstore.open(store_path) as store:
        summary = store.info()
    if fmt == "json":
        emit([summary], "json")
        return
    rows = [{"set": name, "kind": s["kind"], "rows": s["rows"], "subtasks": s["subtasks"],
             "encoding": enc, "bytes": size}
            for name, s in summary["sets"].items() for enc, size in s["encodings"].items()]
    click.echo(f"store {summary['path']}: dim {summary['dim']}, projection {summary['projection']},"
               f" {summary['file_bytes']} bytes on disk")
    emit([{"checkpoint": c["name"], "lr": c["lr"], "step": c["step"], "epoch": c["epoch"]}
          for c in summary["checkpoints"]], fmt)
    emit(rows, fmt)
    centroids = [{"set": name, "checkpoint": c, "centroid_norm": norm}
                 for name, st in summary["sets"].items() for c, norm in st["centroid_norms"].items()]
    if centroids:
        emit(centroids, fmt)


def stage_config(cls, options: dict, prefix: str = ""):
    """The `cls` settings from a command's options, each field from the option named `prefix` +
    field (the one place options become settings); a bad value is a usage error naming its option."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{name: options[prefix + name] for name in names if prefix + name in options})
    except ConfigError as exc:
        ctx = click.get_current_context()
        param = next((p for p in ctx.command.params if p.name == prefix + exc.field), None)
        raise click.BadParameter(str(exc), ctx, param) from None


def model_source(options: dict):
    """The `qless.model.ModelSource` of --model, --dtype and --quant (after `requires("qless")`)."""
    from qless.model import ModelSource

    return ModelSource(options["model"], options["dtype"], options["quant"])


def model_options(fn):
    """--model, --dtype, --quant (the ModelSource) and ReadConfig's options: how examples meet the model."""
    for option in reversed([
        click.option("--model", default="smollm2-135m", show_default=True, help="HF folder, hub id or smollm2-135m."),
        click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True),
        click.option("--quant", type=click.Choice(["nf4", "int8"]), help="QLoRA base model via bitsandbytes."),
        click.option("--max-length", default=ReadConfig.max_length, show_default=True,
                     help="Example length limit in tokens: training rows are truncated to it,"
                          " eval examples longer than it are left out."),
        click.option("--chat-format", type=click.Choice(STAGE_CHAT_FORMATS), default=ReadConfig.chat_format,
                     show_default=True,
                     help="Prompt format for pool and tasks alike: LESS's tulu text, or the tokenizer's chat template."),
        click.option("--skip-invalid", is_flag=True, help="Skip malformed lines (reported at the end) instead of stopping."),
    ]):
        fn = option(fn)
    return fn


def training_options(fn):
    """--data, --out and LESS's training settings (WarmupConfig's and LoraConfig's), shared by
    warmup and train."""
    for option in reversed([
        click.option("--data", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
                     help="Training JSONL (repeatable)."),
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                     help="Folder for the epoch-N checkpoints (a re-run resumes)."),
        click.option("--epochs", default=WarmupConfig.epochs, show_default=True),
        click.option("--lr", default=WarmupConfig.lr, show_default=True,
                     help="Peak learning rate (linear decay, 3% warmup)."),
        click.option("--lora-r", default=LoraConfig.r, show_default=True),
        click.option("--lora-alpha", default=LoraConfig.alpha, show_default=True),
        click.option("--lora-dropout", default=LoraConfig.dropout, show_default=True),
        click.option("--grad-accum", default=WarmupConfig.grad_accum, show_default=True,
                     help="Examples per optimizer step."),
        click.option("--seed", default=WarmupConfig.seed, show_default=True),
    ]):
        fn = option(fn)
    return fn


def _train(stage: str, data, out_dir, silent, options: dict, **extra):
    """Run a training command (`qless.<stage>.<stage>_files`: warmup or train) and say what each
    checkpoint holds."""
    config, lora, read = (stage_config(WarmupConfig, options), stage_config(LoraConfig, options, "lora_"),
                          stage_config(ReadConfig, options))  # usage errors before torch loads
    with requires("qless"):
        files_fn = getattr(importlib.import_module(f"qless.{stage}"), f"{stage}_files")
    report, infos = files_fn(data, out_dir, model_source(options), config, lora=lora, read=read,
                             progress=not silent, **extra)
    note(report.summary(), silent)
    for info in infos:
        note(f"{out_dir}/{info['name']}: step {info['step']}, lr {info['lr']:.4g}", silent)


@cli.command()
@training_options
@click.option("--percentage", default=WARMUP_PERCENTAGE, show_default=True,
              type=click.FloatRange(0, 1, min_open=True), help="Fraction of the pool to train on (LESS: 0.05).")
@model_options
@silent_option
@handle_errors
def warmup(data, out_dir, percentage, silent, **options):
    """LESS step 1: train LoRA on a random fraction of the pool, one checkpoint per epoch.

    Each checkpoint keeps its Adam state and the epoch's mean learning rate, which ingest
    reads to weight it.

    Example:

        gradstore warmup --data pool.jsonl --out warmup --percentage 0.05 --epochs 4
    """
    _train("warmup", data, out_dir, silent, options, percentage=percentage)


@cli.command()
@training_options
@model_options
@silent_option
@handle_errors
def train(data, out_dir, silent, **options):
    """LESS step 4: fine-tune LoRA on a selection (every example of --data), one checkpoint per epoch.

    The warmup's training loop and LESS's settings; a re-run resumes after the last finished
    epoch. The last epoch's folder is the trained adapter (`eval --adapter OUT` finds it).

    Example:

        gradstore query --task mmlu --k 5% --out selected.jsonl

        gradstore train --data selected.jsonl --out run
    """
    _train("train", data, out_dir, silent, options)


@cli.command(name="eval")
@click.option("--task", required=True, help="mmlu, bbh, or a JSONL file of prompt/answer records.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False),
              help="A LoRA adapter folder or a train run (its last epoch); default: the base model.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False),
              help="LESS's data folder for mmlu and bbh (holds eval/mmlu/test, eval/bbh/bbh).")
@click.option("--subtask", "subtasks", multiple=True, type=NAME, help="Evaluate only this subtask (repeatable).")
@click.option("--limit", type=int, help="At most this many examples, taken round robin over the subtasks.")
@click.option("--k-shot", default=EvalConfig.k_shot, show_default=True,
              help="MMLU: demonstrations from the subject's dev questions.")
@click.option("--max-new-tokens", default=EvalConfig.max_new_tokens, show_default=True,
              help="Generation length for exact match (0: no generation, NLL only).")
@click.option("--predictions", type=click.Path(dir_okay=False), help="Write one JSON line per example here.")
@model_options
@output_options
@silent_option
@handle_errors
def eval_(task, adapter, data_dir, predictions, fmt, silent, **options):
    """Evaluate the base model or a trained adapter on a task's held-out examples.

    MMLU: the test split, k-shot from dev; accuracy of the answer letter and NLL of the correct
    letter. BBH: the task files with the 3-shot chain-of-thought prompts; exact match of the
    generated answer and NLL of the target. A JSONL task: NLL of the answer and exact match.
    Prints one row per subtask and an overall row, with the number of examples.

    Example:

        gradstore eval --task mmlu --data-dir ../shared/data --adapter run --limit 500 --table
    """
    with requires("qless"):
        from qless.evaluate import evaluate_files, summarize

    if task in ("mmlu", "bbh") and data_dir is None:
        raise click.UsageError(f"--task {task} needs --data-dir (LESS's data folder)")
    records, skipped = evaluate_files(task, model_source(options), adapter, stage_config(EvalConfig, options),
                                      stage_config(ReadConfig, options), data_dir=data_dir, progress=not silent)
    for line in skipped[:20]:
        note(f"skipped {line}", silent)
    if len(skipped) > 20:
        note(f"... and {len(skipped) - 20} more skipped", silent)
    if predictions:
        import json

        with open(predictions, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    rows = summarize(records, task)
    emit(rows, fmt)


@cli.command()
@click.option("--data", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Training pool JSONL (repeatable); with --task NAME, the task's JSONL.")
@click.option("--set", "set_name", type=NAME, default="train", show_default=True, help="Name of the training set.")
@click.option("--task", type=NAME, help="Ingest a target task instead: mmlu, bbh, tydiqa, a demo task, or NAME with --data.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False),
              help="LESS's data folder for built-in tasks (holds eval/mmlu, eval/bbh, eval/tydiqa).")
@click.option("--checkpoint", "checkpoints", multiple=True, required=True,
              type=click.Path(exists=True, file_okay=False), help="LoRA checkpoint folder (repeatable).")
@click.option("--lr", "lrs", type=FLOATS, help="Comma-separated learning rates, one per checkpoint (default: the folder's"
              " qless_checkpoint.json, or the mean lr a Trainer's trainer_state.json logged in the epoch).")
@model_options
@click.option("--encodings", default=",".join(IngestConfig.encodings), show_default=True, type=ENCODINGS,
              help="Comma-separated encodings to store.")
@click.option("--dim", default=IngestConfig.dim, show_default=True, help="Projection dimension.")
@click.option("--projection", type=click.Choice(PROJECTIONS), default=IngestConfig.projection, show_default=True)
@click.option("--seed", default=IngestConfig.seed, show_default=True, help="Projection seed.")
@click.option("--batch-size", default=IngestConfig.batch_size, show_default=True, help="Rows per store transaction.")
@click.option("--token-budget", default=IngestConfig.token_budget, show_default=True,
              help="Tokens per forward/backward (examples sorted by length, packed into one "
                   "sequence; raise it on a GPU).")
@click.option("--shard", type=SHARD, help="i/n: ingest the i-th of n contiguous shards (default: from torchrun/accelerate).")
@click.option("--ray", "ray_workers", type=click.IntRange(min=1), metavar="N",
              help="Spread the rows over N Ray workers, each writing its own shard store under --store"
                   " (a folder), then --store/manifest.json for `query --store`.")
@store_option()
@silent_option
@handle_errors
def ingest(data, set_name, task, data_dir, checkpoints, lrs, shard, ray_workers, store_path, silent, **options):
    """Compute projected LoRA gradients and write them to the store (resumable).

    Training pools get LESS's Adam directions; tasks get plain gradients.

    Example:

        gradstore ingest --data pool.jsonl --set train --checkpoint warmup/epoch-1 --checkpoint warmup/epoch-2

        gradstore ingest --task mmlu --data-dir ../shared/data --checkpoint warmup/epoch-1

        gradstore ingest --data pool.jsonl --checkpoint warmup/epoch-1 --ray 4 --store pool-shards
    """
    if shard and ray_workers:
        raise click.UsageError("--ray N shards the rows itself; give --shard or --ray, not both")
    config, read = stage_config(IngestConfig, options), stage_config(ReadConfig, options)
    with requires("qless"):
        from qless.ingest import ingest_files, parse_shard

    sharding = {"ray_workers": ray_workers} if ray_workers else {"shard": shard or parse_shard(None)}
    read_report, report = ingest_files(
        store_path, checkpoints, model_source(options), config, data=data, set_name=set_name, task=task,
        data_dir=data_dir, lrs=lrs, read=read, progress=not silent, **sharding)
    if read_report is not None:
        note(read_report.summary(), silent)
    note(report.summary(), silent)
    stores = [s.path for s in read_manifest(os.path.join(store_path, MANIFEST))] if ray_workers else [store_path]
    for path in stores:
        _compact(path, silent)


def _compact(store_path, silent: bool) -> None:
    """After a command that wrote the store: drop the free pages the writes left in the file."""
    try:
        done = gradstore.compact(store_path)
    except gradstore.StoreBusyError as exc:
        note(f"not compacted: {exc} (`gradstore compact`)", silent)
        return
    if done:
        note(f"compacted {store_path}: {done[0]:,} -> {done[1]:,} bytes", silent)


# ---- store operations: merge, requantize, compare, check, compact (gradstore.ops) ---------

def _progress(silent: bool):
    """A tqdm factory for the library's `progress` (on stderr), or None when silent."""
    if silent:
        return None
    import sys

    from tqdm import tqdm

    return functools.partial(tqdm, file=sys.stderr, leave=False)


@cli.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="The new store to create.")
@output_options
@silent_option
@handle_errors
def merge(sources, out, fmt, silent):
    """Combine stores (shards of one pool, or checkpoints computed apart) into a new store.

    The sources must share dim, projection, model and LoRA config; a set's rows are
    concatenated in the order the sources are given. The sources are only read.

    Example:

        gradstore merge shard-0 shard-1 shard-2 -o gradstore
    """
    from gradstore import ops

    report = ops.merge(sources, out, progress=_progress(silent))
    for line in report.notes:
        note(line, silent)
    note(f"merged {len(report.sources)} stores into {report.out}", silent)
    emit(report.to_dicts(), fmt)


@cli.command()
@click.option("--set", "set_name", type=NAME, help="Set to requantize (default: every set).")
@click.option("--to", "to", required=True, type=ENCODINGS, help="Comma-separated encodings to derive, e.g. absmax4,sign1-global.")
@click.option("--from", "source", type=ENCODING, help="Encoding to derive from (default: the best float the set holds).")
@click.option("--allow-lossy", is_flag=True, help="Allow deriving from a quantized encoding.")
@click.option("--replace", is_flag=True, help="Rebuild encodings the set already holds.")
@click.option("--recenter", is_flag=True,
              help="Recompute the centroid from the whole set and re-derive every centered encoding.")
@store_option()
@output_options
@silent_option
@handle_errors
def requantize(set_name, to, source, allow_lossy, replace, recenter, store_path, fmt, silent):
    """Derive lower encodings from the master copy, without the model.

    A `-global` encoding takes one scale per set and checkpoint (QLESS); `info` shows it.
    A `-centered` one subtracts the set's centroid (the whole set's mean if it has none yet).
    New encodings appear at once when done: a killed run leaves the store as it was.

    Example:

        gradstore requantize --to absmax4,sign1 --from f16

        gradstore requantize --set train --to absmax8-global --replace

        gradstore requantize --set train --to sign1-centered --recenter
    """
    from gradstore import ops

    with gradstore.open(store_path, readonly=False) as store:
        done = ops.requantize(store, set_name, to=to, source=source, allow_lossy=allow_lossy,
                              replace=replace, recenter=recenter, progress=_progress(silent))
    note(f"derived {len(done)} encodings", silent)
    _compact(store_path, silent)
    emit([{"set": d["set"], "encoding": d["encoding"], "from": d["from"],
           "rows": sum(d["rows"].values()), "replaced": d["replaced"], "scales": d["scales"]}
          for d in done], fmt)


@cli.command()
@click.argument("queries", nargs=-1, metavar="[QUERY_A QUERY_B]")
@click.option("--task", "-t", "tasks", multiple=True, type=NAME, help="Task to score with --a/--b encodings (repeatable).")
@click.option("--a", "enc_a", type=ENCODING, help="First encoding.")
@click.option("--b", "enc_b", type=ENCODING, help="Second encoding.")
@click.option("--k", "k", default="5%", show_default=True, type=SELECTION_SIZE,
              help="Top k for the overlap: a count or a percentage.")
@click.option("--set", "set_name", type=NAME, help="Training set (default: the store's only one).")
@store_option()
@output_options
@handle_errors
def compare(queries, tasks, enc_a, enc_b, k, set_name, store_path, fmt):
    """How well two encodings (or two queries) agree: Spearman of scores, top-k overlap.

    Example:

        gradstore compare --task mmlu --a absmax8 --b sign1 --k 5%

        gradstore compare "SCORE FROM train BY mmlu AGG max" "SCORE FROM train BY mmlu AGG mean"
    """
    from gradstore import ops

    if queries and (enc_a or enc_b or tasks or set_name):
        raise click.UsageError("give either two QUERY strings or --task with --a and --b, not both")
    if queries and len(queries) != 2:
        raise click.UsageError(f"give two QUERY strings, not {len(queries)}")
    if not queries and not (enc_a and enc_b and tasks):
        raise click.UsageError("give two QUERY strings, or --task with --a and --b")
    a, b = queries or (enc_a, enc_b)
    with gradstore.open(store_path) as store:
        result = ops.compare(store, a, b, tasks=tasks, k=k, set_name=set_name)
    emit([result.to_dict()], fmt)


@cli.command()
@click.option("--fix", is_flag=True, help="Drop what cannot be trusted (listed), keep everything that verifies.")
@store_option()
@silent_option
@handle_errors
def check(fix, store_path, silent):
    """Verify every block's checksum and that the store's records agree.

    Prints one line per problem; exits 1 when problems remain (not fixed).

    Example:

        gradstore check

        gradstore check --fix
    """
    from gradstore import ops

    with gradstore.open(store_path, readonly=not fix) as store:
        report = ops.check(store, fix=fix, progress=_progress(silent))
    for finding in report.findings:
        click.echo(str(finding))
    for line in report.dropped:
        click.echo(f"fixed: {line}")
    if report.ok:
        note(f"ok: {report.blocks} blocks verified", silent)
    elif not fix:
        raise click.ClickException(f"{_problems(report)} found; `gradstore check --fix`"
                                   " drops what cannot be trusted")
    else:
        note(f"{_problems(report)} found and fixed", silent)


@cli.command()
@store_option()
@silent_option
@handle_errors
def compact(store_path, silent):
    """Rewrite the store's file without the free pages that writes left in it.

    ingest, merge and requantize do this when they finish and it saves over 1%; it needs the
    store closed by every other process.

    Example:

        gradstore compact --store ./gradstore
    """
    done = gradstore.compact(store_path, min_free=0)
    note(f"{store_path}: {done[0]:,} -> {done[1]:,} bytes" if done else f"{store_path}: no free pages",
         silent)


def _problems(report) -> str:
    n = len(report.findings)
    return f"{n} problem{'' if n == 1 else 's'}"


@cli.command()
@click.option("--store", "store_path", default="gradstore-demo", show_default=True,
              type=click.Path(file_okay=False), help="Where to leave the demo store.")
@silent_option
@handle_errors
def demo(store_path, silent):
    """Run the whole pipeline on the embedded SmolLM2-135M and a small multi-skill pool.

    Warmup, ingest at f16/absmax8/sign1-centered, then a top-5% selection per task with how strongly
    the matching skill is enriched and how well the quantized selections agree with f16.

    Example:

        gradstore demo --store ./gradstore-demo
    """
    with requires("qless"):
        from qless.demo import run_demo

    run_demo(store_path, echo=click.echo, progress=not silent)


@cli.command()
@click.option("--task", "-t", "tasks", multiple=True, type=NAME, required=True, help="Target task set (repeatable).")
@click.option("--encodings", type=ENCODINGS, help="Encodings to compare (default: all the set holds); the selection"
              " shown is the first one's.")
@click.option("--k", default="5%", show_default=True, type=SELECTION_SIZE, help="Selection size: a count or a percentage.")
@click.option("--set", "set_name", type=NAME, help="Training set (default: the store's only one).")
@click.option("--by", "field", default="category", show_default=True, help="Row metadata field to break the selection down by.")
@click.option("-o", "--out", "out_path", default="gradstore-plot.png", show_default=True, type=click.Path(dir_okay=False))
@store_option()
@silent_option
@handle_errors
def plot(tasks, encodings, k, set_name, field, out_path, store_path, silent):
    """Plot score distributions per encoding and the selection's composition (PNG).

    Example:

        gradstore plot --task mmlu --encodings f16,absmax8,sign1-centered --by source -o mmlu.png
    """
    with requires("plot"):
        import matplotlib  # noqa: F401  (plot_selection imports it when it draws)
    from .plot import plot_selection

    with gradstore.open(store_path) as store:
        plot_selection(store, out_path, tasks, encodings, k=k, set_name=set_name, field=field)
    note(f"wrote {out_path}", silent)
