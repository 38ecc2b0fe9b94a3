"""`hmlm bench`: the options checked, the threads set, and the report of the shapes or of a trained run chosen."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hmlm.errors import UserError


def bench_report(
    json_: bool,
    device: str,
    shape: str | None,
    steps: int | None,
    warmup: int,
    threads: int,
    layer_norm: bool,
    batch: int | None,
    seq_len: int | None,
    memory: bool,
    models: str,
    precision: str,
    launches: bool,
    run: Path | None,
    sample_length: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[str, bool]]:
    """Measure the shapes (or, with `run`, a trained run); the report as text or JSON, in lines to print, each with
    whether it goes to stderr."""
    import torch

    from hmlm.bench.throughput import format_report, run_bench, to_json
    from hmlm.training.memory import out_of_memory_as_user_error

    if threads < 0:
        raise UserError(f"--threads must be positive (or 0 for torch's choice), not {threads}")
    if threads:
        torch.set_num_threads(threads)

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
        return [(to_json(report) if json_ else format_run_report(report), False)]
    chosen = tuple(key.strip() for key in models.split(",") if key.strip())
    what = f"benchmarking shape {shape or 'default'} (batch {batch or 'default'}, seq_len {seq_len or 'default'})"
    with out_of_memory_as_user_error(what, "--batch or --seq-len, or pick a smaller --shape"):
        report = run_bench(shape, device, steps, warmup, layer_norm, memory=memory, batch=batch, seq_len=seq_len,
                           progress=progress, models=chosen, precision=precision, launches=launches)  # fmt: skip
    return [(to_json(report) if json_ else format_report(report), False)]
