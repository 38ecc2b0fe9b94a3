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


def _print(lines: list[tuple[str, bool]]) -> None:
    """Echo a command's lines, each to stderr where it says so."""
    for text, err in lines:
        typer.echo(text, err=err)


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
    from hmlm.commands import prepare_data

    _print(
        prepare_data(name, file, data_dir, source, no_verify, force, name_, level, split, separator, seed, no_spaces)
    )


@app.command()
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file, e.g. configs/tiny.yaml."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Where the run goes. (default: runs/CONFIG_NAME)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a model; curves go to TensorBoard in the run directory, checkpoints to RUN/checkpoints/."""
    from hmlm.commands import train_run

    _print(train_run(config, set_, run_dir, resume, quiet))


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
    from hmlm.commands import evaluate_run

    _print(evaluate_run(run, split, checkpoint, batch_size, data_dir, json_, device))


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
    from hmlm.commands import sample_run

    _print(sample_run(run, prompt, length, temperature, top_k, seed, checkpoint, device))


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
    from hmlm.analysis.boundaries.command import boundaries_report

    _print(boundaries_report(run, text, split, out, json_, checkpoint, wrap, seed, batch_size, max_tokens, data_dir,
                             device))  # fmt: skip


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
    from hmlm.bench.command import bench_report

    def progress(done: int, total: int) -> None:
        typer.echo(f"\rbench: round {done}/{total}", err=True, nl=done == total)

    _print(bench_report(json_, device, shape, steps, warmup, threads, layer_norm, batch, seq_len, memory, models,
                        precision, launches, run, sample_length, progress))  # fmt: skip


def main() -> None:
    try:
        app()
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
