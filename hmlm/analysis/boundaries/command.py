"""`hmlm boundaries`: one text read and shown (a text view, a figure, or JSON), or a whole split scored."""

from __future__ import annotations

import json
from pathlib import Path

from hmlm.analysis.boundaries.drawing import check_figure_args, draw
from hmlm.analysis.boundaries.metrics import split_references
from hmlm.analysis.boundaries.reading import read_text, require_boundaries
from hmlm.errors import UserError


def boundaries_report(
    run: Path,
    text: str | None,
    split: str | None,
    out: Path | None,
    json_: bool,
    checkpoint: str,
    wrap: int,
    seed: int,
    batch_size: int,
    max_tokens: int,
    data_dir: Path | None,
    device: str,
) -> list[tuple[str, bool]]:
    """Read `text` (drawn into `out`, if given) or score a whole `split`; the lines to print, each with whether it
    goes to stderr."""
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

    lines: list[tuple[str, bool]] = []
    if text is not None:
        result = read_text(trained.model, trained.vocab, text, seed)
        if out is not None:
            width, height = draw(result, out, wrap, title=f"{trained.path}: where each layer closes a segment")
            # With --json the object alone goes to stdout, so that it stays parseable.
            lines.append((f"wrote {out} ({width}x{height} pixels, {len(result.symbols)} symbols)", json_))
        if json_:
            lines.append((json.dumps(result.to_json() | {"checkpoint": str(trained.path)}), False))
        elif out is None:
            lines.append((result.view(wrap), False))
        return lines

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
        return [(json.dumps(report | stats.flat()), False)]
    lines.append(
        (f"{config.data.name} {split}: {result.tokens:,} tokens, bpc {result.bpc:.4f} ({trained.path})", False)
    )
    if not references:
        lines.append(("(no reference boundaries: this vocabulary has no space symbol)", False))
    lines.append((stats.table(), False))
    return lines
