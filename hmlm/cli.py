"""The `hmlm` command line: parse arguments, call one function per command, turn known errors into one line.

Each command imports its module inside the function, so `hmlm --help` stays fast and nothing imports cli.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from hmlm.errors import UserError

app = typer.Typer(
    help="Character-level language modelling with the Hierarchical Multiscale LSTM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

SET_HELP = "Override a config key, e.g. -s model.hidden_sizes=[256,256,256] (value parsed as YAML). Repeatable."
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N."
RUN_HELP = "A run directory (runs/NAME), its checkpoints/ folder, or a checkpoint file."


def _version(value: bool) -> None:
    if value:
        from hmlm import __version__

        typer.echo(f"hmlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Character-level language modelling with the Hierarchical Multiscale LSTM."""


@config_app.command("show")
def config_show(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
) -> None:
    """Print the resolved config (defaults, then the file, then -s overrides) as YAML."""
    from hmlm.config import load_config

    typer.echo(load_config(config, set_).to_yaml(), nl=False)


@app.command()
def data(
    name: str = typer.Argument(
        ...,
        metavar="NAME",
        help="ptb, text8 or enwik8 (downloaded from their official sites), synthetic (generated here, with "
        "true word and phrase boundaries), or text (your own FILE).",
    ),
    file: Path | None = typer.Argument(
        None, metavar="FILE", help="For `text`: the file, or a folder of files, to prepare."
    ),
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="Where datasets go: DATA_DIR/NAME/."),
    source: str | None = typer.Option(
        None, "--source", help="A mirror URL, a downloaded archive, or a folder holding the extracted files."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the checksums of the official files."),
    force: bool = typer.Option(False, "--force", help="Prepare again even when the dataset is already there."),
    name_: str | None = typer.Option(
        None, "--name", help="For `text`: the dataset's name. (default: the stem of FILE)"
    ),
    level: str | None = typer.Option(
        None, "--level", help="For `text`: chars (Unicode characters of UTF-8 text) or bytes. (default: chars)"
    ),
    split: str | None = typer.Option(
        None, "--split", help="For `text`: train,valid,test fractions. (default: 0.9,0.05,0.05)"
    ),
    separator: str | None = typer.Option(
        None, "--separator", help="For `text` with a folder: put between files (escapes like \\n; default: \\n)"
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="For `synthetic`: another text of the same language. (default: 0)"
    ),
    no_spaces: bool = typer.Option(
        False, "--no-spaces", help="For `synthetic`: nothing between the words of a phrase (phrase punctuation kept)."
    ),
) -> None:
    """Download, verify and tokenize a dataset into DATA_DIR/NAME/ (or prepare your own text with `text FILE`).

    Examples: `hmlm data ptb`, `hmlm data enwik8 --source ~/enwik8.zip`, `hmlm data text book.txt`.
    """
    from hmlm.data import DATASETS, open_dataset, prepare_dataset, prepare_text
    from hmlm.data.text import DEFAULT_SPLIT, parse_separator, parse_split

    if name == "text":
        if file is None:
            raise UserError("`hmlm data text` needs the FILE (or folder) to prepare: hmlm data text FILE")
        if source is not None or no_verify:
            raise UserError("--source and --no-verify are for the downloaded datasets, not for `text`")
        if seed is not None or no_spaces:
            raise UserError(f"{'--seed' if seed is not None else '--no-spaces'} is for `hmlm data synthetic` only")
        path = prepare_text(
            file,
            name=name_,
            data_dir=data_dir,
            level=level or "chars",
            split=parse_split(split) if split is not None else DEFAULT_SPLIT,
            separator=parse_separator(separator) if separator is not None else "\n",
            force=force,
        )
    else:
        if name not in DATASETS:
            raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or text FILE")
        given = {"FILE": file, "--name": name_, "--level": level, "--split": split, "--separator": separator}
        text_only = [flag for flag, value in given.items() if value is not None]
        if text_only:
            raise UserError(f"{', '.join(text_only)}: only for `hmlm data text FILE`, not for {name}")
        path = prepare_dataset(name, data_dir=data_dir, source=source, verify=not no_verify, force=force, seed=seed,
                               spaces=not no_spaces)  # fmt: skip

    dataset = open_dataset(path.name, path.parent)
    tokens = " / ".join(f"{dataset.tokens(s):,}" for s in ("train", "valid", "test"))
    vocab = f"{len(dataset.vocab)} symbols ({dataset.vocab.kind})"
    typer.echo(f"{dataset.name} in {dataset.path}: {tokens} tokens (train / valid / test), {vocab}")


@app.command()
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file, e.g. configs/tiny.yaml."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Where the run goes. (default: runs/CONFIG_NAME)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a model; curves go to TensorBoard in the run directory, checkpoints to RUN/checkpoints/."""
    from hmlm.config import load_config
    from hmlm.training.trainer import train as run_training

    if run_dir is None:
        if config is None:
            raise UserError("pass --config FILE for a new run, or --run-dir DIR --resume to continue one")
        run_dir = Path("runs") / config.stem
    loaded = load_config(config, set_) if config is not None and not resume else None
    # A finished run resumed is refused like every limit (hmlm.training.limits.AlreadyFinished: one line, exit status
    # 2).
    summary = run_training(loaded, run_dir, resume=resume, overrides=set_ if resume else [], progress=not quiet)
    if summary.main_process:
        typer.echo(
            f"{summary.stopped} at step {summary.step} (epoch {summary.epoch}); "
            f"best valid bpc {summary.best_valid_bpc:.4f}; run in {summary.run_dir}"
        )


@app.command("eval")
def evaluate_command(
    run: Path = typer.Argument(..., help=RUN_HELP),
    split: str = typer.Option("valid", "--split", help="valid or test."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
    batch_size: int = typer.Option(64, "--batch-size", help="Contiguous streams evaluated together."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Prepared datasets. (default: the run's data.dir)"),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of a sentence."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Print bits per character on a split, with the state carried across the whole split."""
    import json

    from hmlm.analysis.boundaries import split_references
    from hmlm.analysis.evaluate import evaluate
    from hmlm.checkpoint import load_trained
    from hmlm.data import open_dataset
    from hmlm.devices import resolve_device
    from hmlm.training.limits import check_evaluation, evaluation_out_of_memory

    if split not in ("valid", "test"):
        raise UserError(f"--split must be valid or test, not {split!r}")
    target = resolve_device(device)
    trained = load_trained(run, checkpoint, target)
    config, path = trained.config, trained.path
    dataset = open_dataset(config.data.name, data_dir or config.data.dir)
    check_evaluation(trained, dataset, split, batch_size)
    with evaluation_out_of_memory(trained, batch_size):
        result = evaluate(trained.model, dataset.split(split), batch_size, config.train.seq_len, device=target,
                          progress=not json_, references=split_references(dataset, split))  # fmt: skip
    report = {"bpc": result.bpc, "split": split, "tokens": result.tokens, "loss": result.loss,
              "checkpoint": str(path), "dataset": config.data.name}  # fmt: skip
    report |= {f"boundary_rate_layer{i + 1}": rate for i, rate in enumerate(result.boundary_rate)}
    if result.boundary_stats is not None:  # boundary_f1_word_layer1, ..., _surprisal_peak (`hmlm boundaries` adds more)
        report |= result.boundary_stats.flat(baselines=False, rates=False)
    locks = result.locks
    if locks is not None and locks.layer:  # streams read from the zero state, locked into a layer firing every step
        report |= {"streams": locks.streams, "locked_streams": locks.locked, "locked_bpc": locks.bpc}
    if json_:
        typer.echo(json.dumps(report))
    else:
        locked = ""
        if locks is not None and locks.layer:
            locked = f", {locks.locked} of {locks.streams} streams locked"
            locked += f" (at {locks.bpc:.3f} bpc)" if locks.bpc is not None else ""
        typer.echo(f"{split} bpc {result.bpc:.4f} over {result.tokens:,} tokens{locked} ({path})")
    if locks is not None and locks.warning():
        typer.echo(locks.warning(), err=True)


@app.command()
def sample(
    run: Path = typer.Argument(..., help=RUN_HELP),
    prompt: str = typer.Option(
        ..., "--prompt", "-p", help="Text to start from; its characters must be in the vocabulary."
    ),
    length: int = typer.Option(200, "--length", "-n", help="Symbols to generate."),
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="Below 1 is more conservative."),
    top_k: int = typer.Option(0, "--top-k", help="Draw only from the K likeliest symbols; 0 for all."),
    seed: int = typer.Option(0, "--seed", help="The same seed gives the same text."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Print the prompt, then stream LENGTH generated symbols to stdout."""
    import torch

    from hmlm.analysis.locks import LOCK_RATE, LOCK_TAIL, LockWatch
    from hmlm.analysis.sample import generate
    from hmlm.checkpoint import load_model as load
    from hmlm.devices import resolve_device
    from hmlm.training.memory import out_of_memory_in

    model, vocab = load(run, checkpoint, resolve_device(device))
    watch = LockWatch()
    pieces = generate(model, vocab, prompt, length, temperature, top_k, torch.Generator().manual_seed(seed), watch)
    pieces = out_of_memory_in(pieces, f"sampling after a prompt of {len(prompt):,} characters", "--prompt's length")
    first = next(pieces, "")  # encode the prompt (and fail on unknown characters) before printing anything
    sys.stdout.write(prompt + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    locks = watch.result()
    if locks.locked:
        typer.echo(f"warning: the sample locked: layer {locks.layer} fired on more than {LOCK_RATE:.0%} of its "
                   f"last {min(watch.steps, LOCK_TAIL)} steps, so the text after that point is degraded; a model "
                   "trained with train.reset_every (the shipped configs) does not lock", err=True)  # fmt: skip


@app.command("boundaries")
def boundaries_command(
    run: Path = typer.Argument(..., help=RUN_HELP),
    text: str | None = typer.Option(
        None, "--text", help="The text to read, from a fresh state (a typed space stands for the dataset's space)."
    ),
    split: str | None = typer.Option(
        None, "--split", help="Instead of a text, score a whole split (valid or test), with the baselines."
    ),
    out: Path | None = typer.Option(None, "--out", help="With --text: draw the figure into this .png file."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object (the figure, if any, is still drawn)."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
    wrap: int = typer.Option(100, "--wrap", help="Symbols per row of the figure and of the text view."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random-boundaries baseline."),
    batch_size: int = typer.Option(64, "--batch-size", help="With --split: contiguous streams read together."),
    max_tokens: int = typer.Option(0, "--max-tokens", help="With --split: score about the first N tokens; 0: all."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Prepared datasets. (default: the run's data.dir)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Where each layer's boundary detector closes a segment, and how well that matches word boundaries.

    With --text, like the paper's Figure 3: prints the text with a | under it wherever a layer closes a
    segment, then the statistics; --out FIG.png draws the boundaries z and the output gates g over the text;
    --json prints the symbols, every layer's z and g at every position, and the statistics.

    With --split: the statistics over a whole split, with the state carried as in `hmlm eval`.

    Statistics, per layer: the firing rate, the mean segment length, and precision / recall / F1 against word
    boundaries (the space symbol; on the synthetic corpus its true word ends, and its phrase ends too). A
    boundary hits a word when it fires on the word's last symbol or on the space after it. Next to them, three
    baselines: a boundary after every symbol, random boundaries at the layer's own rate, and the model's own
    surprisal peaks (where -log p of the next symbol is larger than at both neighbours).

    Examples: `hmlm boundaries runs/ptb --text "the company said" --out fig.png`,
    `hmlm boundaries runs/ptb --split test`.
    """
    import json

    from hmlm.analysis.boundaries import check_figure_args, read_text, require_boundaries, split_references
    from hmlm.checkpoint import load_trained
    from hmlm.devices import resolve_device

    if (text is None) == (split is None):
        raise UserError("pass either --text TEXT (one text, drawn with --out) or --split valid|test (a whole split)")
    if split is not None and out is not None:
        raise UserError("--out draws a text: use it with --text, not with --split")
    check_figure_args(out, wrap)  # before the model runs
    target = resolve_device(device)
    trained = load_trained(run, checkpoint, target)
    require_boundaries(trained.model)

    if text is not None:
        result = read_text(trained.model, trained.vocab, text, seed)
        if out is not None:
            from hmlm.analysis.boundaries import draw

            width, height = draw(result, out, wrap, title=f"{trained.path}: where each layer closes a segment")
            # With --json the object alone goes to stdout, so that it stays parseable.
            typer.echo(f"wrote {out} ({width}x{height} pixels, {len(result.symbols)} symbols)", err=json_)
        if json_:
            typer.echo(json.dumps(result.to_json() | {"checkpoint": str(trained.path)}))
        elif out is None:
            typer.echo(result.view(wrap))
        return

    from hmlm.analysis.evaluate import evaluate
    from hmlm.data import open_dataset

    if split not in ("valid", "test"):
        raise UserError(f"--split must be valid or test, not {split!r}")
    config = trained.config
    dataset = open_dataset(config.data.name, data_dir or config.data.dir)
    references = split_references(dataset, split)
    result = evaluate(trained.model, dataset.split(split), batch_size, config.train.seq_len, device=target,
                      max_tokens=max_tokens, progress=not json_, references=references, seed=seed)  # fmt: skip
    stats = result.boundary_stats
    assert stats is not None  # the model has boundaries and references were given
    if json_:
        report = {"split": split, "tokens": result.tokens, "bpc": result.bpc, "checkpoint": str(trained.path),
                  "dataset": config.data.name}  # fmt: skip
        typer.echo(json.dumps(report | stats.flat()))
        return
    typer.echo(f"{config.data.name} {split}: {result.tokens:,} tokens, bpc {result.bpc:.4f} ({trained.path})")
    if not references:
        typer.echo("(no reference boundaries: this vocabulary has no space symbol)")
    typer.echo(stats.table())


@app.command()
def bench(
    json_: bool = typer.Option(False, "--json", help="Print the results as a JSON object."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    shape: str = typer.Option(
        None, "--shape", help="ptb, text8, enwik8 or small (default: small on CPU, ptb on CUDA)."
    ),
    steps: int = typer.Option(None, "--steps", help="Measured rounds (default: 10 on CPU, 20 on CUDA)."),
    warmup: int = typer.Option(2, "--warmup", help="Warm-up rounds, not measured."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch; 0: torch's own choice."),
    layer_norm: bool = typer.Option(True, "--layer-norm/--no-layer-norm", help="HM-LSTM with layer norm (paper)."),
    batch: int = typer.Option(None, "--batch", help="Override the shape's batch size."),
    seq_len: int = typer.Option(None, "--seq-len", help="Override the shape's sequence length (1: sampling)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak training memory."),
    models: str = typer.Option(
        "fast,reference,lstm", "--models", help="Comma-separated: fast, reference, lstm, graph (CUDA: fast + graph)."
    ),
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="As train.precision, for every model alike: fp32 (TF32 on CUDA), fp32-strict (no TF32), bf16 (CUDA; "
        "on the CPU with --launches).",
    ),
    launches: bool = typer.Option(
        False,
        "--launches",
        help="Count kernel launches per training step: by dispatch (also on the CPU, where it admits "
        "--precision bf16), and with the profiler on CUDA.",
    ),
    run: Path = typer.Option(
        None,
        "--run",
        help="Measure this trained HM-LSTM run instead: sampling and evaluation on its dataset's text, "
        "skipping COPY and not, against nn.LSTM (--batch, --seq-len: the evaluation's; default 64 x 100).",
    ),
    sample_length: int = typer.Option(100, "--sample-length", help="With --run: symbols sampled per round."),
) -> None:
    """Training and inference throughput of HM-LSTM (fast and reference) against torch's nn.LSTM of the same size.

    The fast path's kernels: C++ on the CPU (make install builds them), Triton on CUDA; HMLM_KERNELS=torch: torch ops.
    With --run: the inference speed of a trained model at its real boundary rates (HMLM_SKIP_COPY=0 for comparison).
    """
    import torch

    from hmlm.bench.throughput import format_report, run_bench, to_json
    from hmlm.training.memory import out_of_memory_as_user_error

    if threads < 0:
        raise UserError(f"--threads must be positive (or 0 for torch's choice), not {threads}")
    if threads:
        torch.set_num_threads(threads)

    def progress(done: int, total: int) -> None:
        typer.echo(f"\rbench: round {done}/{total}", err=True, nl=done == total)

    if run is not None:
        from hmlm.bench.trained import format_run_report, run_bench_on_run

        # --run measures the run's own model, in float32, without gradients: the training-shape options do not apply.
        if shape is not None:
            raise UserError("--shape does not go with --run: the run's own model is measured")
        if launches or precision != "fp32" or models != "fast,reference,lstm":
            raise UserError("--models, --precision and --launches do not go with --run: they are for the shapes")
        what = f"benchmarking run {run} (evaluation batch {batch or 64}, seq_len {seq_len or 100})"
        with out_of_memory_as_user_error(what, "--batch or --seq-len"):
            report = run_bench_on_run(run, device, steps, warmup, batch, seq_len, sample_length, progress)
        typer.echo(to_json(report) if json_ else format_run_report(report))
        return
    chosen = tuple(key.strip() for key in models.split(",") if key.strip())
    what = f"benchmarking shape {shape or 'default'} (batch {batch or 'default'}, seq_len {seq_len or 'default'})"
    with out_of_memory_as_user_error(what, "--batch or --seq-len, or pick a smaller --shape"):
        report = run_bench(shape, device, steps, warmup, layer_norm, memory=memory, batch=batch, seq_len=seq_len,
                           progress=progress, models=chosen, precision=precision, launches=launches)  # fmt: skip
    typer.echo(to_json(report) if json_ else format_report(report))


def main() -> None:
    try:
        app()
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
