"""`make gpu-check`: everything only a GPU can show, in one run of at most 8 minutes, written to ONE report file.

    PYTHONPATH=. python tools/gpu_check.py --data-dir gpu-data --out $OUT      # what `make gpu-check` runs

It runs the package from the checkout with the machine's own torch (no install, no network), and needs the enwik8
prefix prepared by `make gpu-data` (an ignored folder, carried to the GPU machine): the first lines it prints, and
the report's, say so and whether it was found. Sections, in order, each in its own process with a time limit that
the plan fixes in advance (LIMITS: they add up to the default budget of 470 s, so every section gets its time and
none runs on what the others left), so that one failing or hanging section costs only itself:

  env        torch, CUDA, the GPU, triton, and which of hmlm's dependencies import here
  launches   kernel launches per training step at the enwik8 shape, HMLM_KERNELS=triton (bf16, fp32) and =torch
             (bf16), eager and graph: by dispatch counting and from the profiler
  bench      hmlm bench --device cuda at the ptb and text8 shapes: the Triton kernels, Triton + CUDA graph, nn.LSTM
             and the torch-op loop (HMLM_KERNELS=torch), under bf16, then fp32 (TF32), in order of importance, as
             many as its limit allows: the README's GPU goals are these figures
  enwik8     75 seconds of `hmlm train --config configs/enwik8.yaml` on the real prefix (evaluation and sample at
             the end)
  eval       that run's test bpc, the time to evaluate 5M symbols, and a generated sample, on the GPU
  tests      pytest -m "cuda or triton": the tests that need a GPU (graph replay == eager step, bf16 step, ...) and
             tests/test_kernels_triton.py, the Triton kernels compiled, against the reference in float64 and float32
             (last: it compiles many small kernel variants; tools/compile_kernels.py compiles the real ones in CI)

The report (`gpu_check.md` in --out) is rewritten after every section: a summary with each section's time against
its limit, then every figure as JSON. `--cpu-smoke` runs the same plan (sections, order, limits, budget) with tiny
sizes on the CPU: a rehearsal of the plumbing and of the timing (the tests' check of this module).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT = "gpu_check.md"
BUDGET = 470.0  # seconds: the 8 minutes of the check, less a margin for the start and the copies
# Each section's limit, in the order the sections run. They add up to the budget (tests/test_gpu_check.py).
LIMITS = {"env": 15, "launches": 45, "bench": 160, "enwik8": 110, "eval": 45, "tests": 95}
PREPARE = "needs the enwik8 prefix prepared by `make gpu-data` (into gpu-data/) and that folder carried to this machine"
DEPENDENCIES = ("torch", "triton", "typer", "yaml", "tqdm", "tensorboard", "numpy", "matplotlib", "pytest")


@dataclass
class Plan:
    """What each section runs: the real sizes, or tiny ones for --cpu-smoke."""

    device: str
    budget: float  # seconds for the whole check
    tests: list[str]
    launch_shape: str
    bench_shapes: tuple[str, ...]
    precisions: tuple[str, ...]
    bench_args: list[str]  # steps, warm-up, sizes
    kernel_sets: tuple[str, ...]  # HMLM_KERNELS values to compare
    train_args: list[str]  # -s overrides for the enwik8 run
    train_seconds: float
    eval_symbols: int
    sample_length: int
    limits: dict[str, float] = field(default_factory=dict)  # seconds per section at most


def overrides(*items: str) -> list[str]:
    return [arg for item in items for arg in ("-s", item)]


def gpu_plan(budget: float) -> Plan:
    return Plan(
        device="cuda",
        budget=budget,
        tests=["-m", "cuda or triton", "tests"],  # the Triton kernels' tests run compiled on the GPU
        launch_shape="enwik8",
        bench_shapes=("ptb", "text8"),
        precisions=("bf16", "fp32"),  # fp32: TF32 on, as train.precision fp32
        bench_args=["--steps", "5", "--warmup", "2"],
        kernel_sets=("torch", "triton"),
        train_args=overrides("train.eval_tokens=200000", "train.eval_every=100000000", "train.sample_length=200"),
        train_seconds=75,
        eval_symbols=5_000_000,
        sample_length=200,
        limits=dict(LIMITS),
    )


def smoke_plan(budget: float) -> Plan:
    tiny = overrides("model.hidden_sizes=[8,8]", "model.embed_dim=4", "model.output_embed_dim=8", "train.batch_size=2")
    tiny += overrides("train.seq_len=8", "train.eval_tokens=64", "train.max_steps=3", "train.sample_length=10")
    return Plan(
        device="cpu",
        budget=budget,
        tests=["-m", "cuda", "tests/test_cuda_graph.py"],
        launch_shape="small",
        bench_shapes=("small",),
        precisions=("fp32",),
        bench_args=["--steps", "1", "--warmup", "0", "--batch", "2", "--seq-len", "3", "--no-memory"],
        kernel_sets=("torch",),
        train_args=tiny,
        train_seconds=20,
        eval_symbols=2_000,
        sample_length=10,
        limits=dict(LIMITS),  # the same plan as on the GPU, with tiny sizes: a rehearsal of its timing
    )


# --- Running a command with a time limit --------------------------------------------------------------------------


def run_command(args: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `args` in its own process group; on timeout kill that group. Returns rc, seconds and output tails."""
    started = time.monotonic()
    child = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = child.communicate(timeout=max(timeout, 1))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        timed_out = True
    return {
        "command": " ".join(args),
        "env": env or {},
        "rc": child.returncode,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - started, 1),
        "stdout": stdout,
        "stderr_tail": tail(stderr),
    }


def tail(text: str, lines: int = 15) -> str:
    kept = [line for line in text.splitlines() if line.strip() and not line.startswith("USDT:")]
    return "\n".join(kept[-lines:])


def hmlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "hmlm", *args]


# --- The sections ---------------------------------------------------------------------------------------------------


def section_env(plan: Plan, limit: float) -> dict[str, Any]:
    found = {name: importlib.util.find_spec(name) is not None for name in DEPENDENCIES}
    info: dict[str, Any] = {"python": sys.version.split()[0], "modules_found": found}
    code = (
        "import json, torch; cuda = torch.cuda.is_available(); out = {'torch': torch.__version__, 'cuda': cuda, "
        "'cuda_version': torch.version.cuda}\n"
        "if cuda: out |= {'gpu': torch.cuda.get_device_name(), 'capability': list(torch.cuda.get_device_capability()),"
        " 'memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}\n"
        "try:\n import triton; out['triton'] = triton.__version__\nexcept Exception as e: out['triton'] = repr(e)\n"
        "print(json.dumps(out))"
    )
    result = run_command([sys.executable, "-c", code], limit)
    info |= json.loads(result["stdout"].strip().splitlines()[-1]) if result["rc"] == 0 else {"error": result}
    try:
        commit = run_command(["git", "rev-parse", "--short", "HEAD"], 10)
        info["commit"] = commit["stdout"].strip() if commit["rc"] == 0 else None
    except OSError:  # no git on that machine
        info["commit"] = None
    info["HMLM_KERNELS"] = os.environ.get("HMLM_KERNELS")
    return info


def section_tests(plan: Plan, limit: float) -> dict[str, Any]:
    result = run_command([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *plan.tests], limit)
    summary = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail(result["stdout"], 3))
    counts = {kind: int(n) for n, kind in summary}
    return {"counts": counts, "rc": result["rc"], "timed_out": result["timed_out"], "seconds": result["seconds"],
            "command": result["command"], "output_tail": tail(result["stdout"], 40)}  # fmt: skip


def bench_json(plan: Plan, args: list[str], kernels: str, limit: float) -> dict[str, Any]:
    """One `hmlm bench --json` process with HMLM_KERNELS=kernels; its report, or what went wrong."""
    result = run_command(hmlm("bench", "--json", "--device", plan.device, *args), limit, {"HMLM_KERNELS": kernels})
    if result["rc"] != 0 or result["timed_out"]:
        return {"error": {k: result[k] for k in ("command", "rc", "timed_out", "seconds", "stderr_tail")}}
    report = json.loads(result["stdout"])
    report["command"] = f"HMLM_KERNELS={kernels} {result['command']}"
    report["seconds"] = result["seconds"]
    report["stderr_tail"] = result["stderr_tail"]
    return report


def section_launches(plan: Plan, limit: float, deadline: float) -> dict[str, Any]:
    """Launches per training step: the fused kernels in bf16 and fp32, then the torch-op loop, as time allows."""
    gpu = plan.device == "cuda"
    models = "fast,graph" if gpu else "fast,lstm"
    args = ["--shape", plan.launch_shape, "--models", models, "--launches", "--steps", "1", "--warmup", "1"]
    args += ["--no-memory"] + ([] if gpu else ["--batch", "2", "--seq-len", "3"])
    stop = min(deadline, time.monotonic() + limit)
    out: dict[str, Any] = {}
    variants = [(kernels, precision) for kernels in plan.kernel_sets[::-1] for precision in plan.precisions]
    for kernels, precision in variants[:3]:  # triton bf16, triton fp32, then the torch ops' bf16
        key = f"{kernels} {precision}"
        remaining = stop - time.monotonic()
        if remaining < 10:
            out[key] = {"skipped": "time budget"}
            continue
        report = bench_json(plan, [*args, "--precision", precision], kernels, remaining)
        if "error" in report:
            out[key] = report
            continue
        out[key] = {
            "command": report["command"],
            "fast_kernels_detail": report["fast_kernels_detail"],
            "per_train_step": {r["label"]: r["launches_per_train_step"] for r in report["results"].values()},
        }
    return out


def section_bench(plan: Plan, limit: float, deadline: float) -> dict[str, Any]:
    """The variants in order of importance; each one that still fits the budget runs (in its own process)."""
    stop = min(deadline, time.monotonic() + limit)
    runs: list[dict[str, Any]] = []
    gpu = plan.device == "cuda"
    for precision in plan.precisions:
        for kernels in plan.kernel_sets[::-1]:  # the fused kernels first: the goals are theirs
            for shape in plan.bench_shapes:
                models = "fast,graph,lstm" if gpu and kernels != "torch" else "fast,lstm"
                remaining = stop - time.monotonic()
                args = ["--shape", shape, "--precision", precision, "--models", models, *plan.bench_args]
                if remaining < 15:
                    runs.append({"skipped": "time budget", "shape": shape, "precision": precision, "kernels": kernels})
                    continue
                report = bench_json(plan, args, kernels, min(remaining, 90))
                report |= {"variant": {"shape": shape, "precision": precision, "kernels": kernels}}
                runs.append(report)
    return {"runs": runs}


def section_enwik8(plan: Plan, limit: float, data_dir: Path, out: Path) -> dict[str, Any]:
    run_dir = out / "enwik8-run"
    if plan.device == "cuda":
        if not (data_dir / "enwik8" / "train.bin").exists():
            return {"error": f"no prepared enwik8 prefix in {data_dir}: run `make gpu-data` and carry that folder"}
        config = ["--config", "configs/enwik8.yaml", "-s", f"data.dir={data_dir}"]
    else:  # the smoke run: the synthetic corpus, prepared on the spot
        from hmlm.data import prepare_dataset

        prepare_dataset("synthetic", data_dir)
        config = ["--config", "configs/tiny.yaml", "-s", f"data.dir={data_dir}"]
    args = [*config, "-s", f"train.device={plan.device}", "-s", f"train.max_time={plan.train_seconds}",
            *plan.train_args, "--run-dir", str(run_dir), "-q"]  # fmt: skip
    result = run_command(hmlm("train", *args), limit)
    return {k: result[k] for k in ("command", "rc", "timed_out", "seconds", "stderr_tail")} | {
        "stdout_tail": tail(result["stdout"], 5),
        "run_dir": str(run_dir),
    }


def section_eval(plan: Plan, limit: float, out: Path) -> dict[str, Any]:
    run_dir = out / "enwik8-run"
    args = [sys.executable, str(Path(__file__).resolve()), "--eval-run", str(run_dir), "--device", plan.device]
    args += ["--eval-symbols", str(plan.eval_symbols), "--sample-length", str(plan.sample_length)]
    result = run_command(args, limit)
    if result["rc"] != 0:
        return {"error": {k: result[k] for k in ("command", "rc", "timed_out", "seconds", "stderr_tail")}}
    return json.loads(result["stdout"].strip().splitlines()[-1])


def evaluate_run(run_dir: Path, device_name: str, symbols: int, sample_length: int) -> dict[str, Any]:
    """In the child: the trained run's speed of training, its test bpc, the time to evaluate `symbols` symbols (the
    train split repeated to that length: the goal is for enwik8's 5M-symbol test split), and a sample."""
    import numpy as np
    import torch

    from hmlm.analysis.evaluate import evaluate
    from hmlm.analysis.sample import generate
    from hmlm.checkpoint import load_checkpoint, load_trained
    from hmlm.data import open_dataset

    device = torch.device(device_name)
    trained = load_trained(run_dir, "last")
    model, config = trained.model.to(device), trained.config
    schedule = load_checkpoint(run_dir / "checkpoints" / "last.pt")["schedule"]
    dataset = open_dataset(config.data.name, config.data.dir)
    out: dict[str, Any] = {
        "steps": schedule["step"],
        "train_seconds": round(schedule["elapsed"], 1),
        "train_chars_per_s": round(
            schedule["step"] * config.train.batch_size * config.train.seq_len / max(schedule["elapsed"], 1e-9)
        ),
        "best_valid_bpc": schedule["best_valid_loss"] / np.log(2),
    }

    def timed_eval(tokens) -> tuple[float, Any]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.monotonic()
        result = evaluate(model, tokens, 64, config.train.seq_len, device=device)
        return time.monotonic() - started, result

    seconds, result = timed_eval(dataset.split("test"))
    out |= {"test_bpc": result.bpc, "test_tokens": result.tokens, "test_eval_seconds": round(seconds, 2)}
    seconds, result = timed_eval(np.resize(np.asarray(dataset.split("train")), symbols))
    out |= {"eval_symbols": symbols, "eval_seconds": round(seconds, 2), "eval_batch_size": 64}
    started = time.monotonic()
    prompt = dataset.vocab.decode([int(t) for t in dataset.split("valid")[:40]])
    generator = torch.Generator(device=device).manual_seed(0)
    text = "".join(generate(model, dataset.vocab, prompt, sample_length, 1.0, 0, generator))
    out |= {"sample_prompt": prompt, "sample": text, "sample_seconds": round(time.monotonic() - started, 2)}
    return out


# --- The report -----------------------------------------------------------------------------------------------------


def write_report(out: Path, report: dict[str, Any]) -> Path:
    path = out / REPORT
    text = summary(report) + "\n\n## Everything, as JSON\n\n```json\n" + json.dumps(report, indent=2) + "\n```\n"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{REPORT}.")
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(tmp, path)
    return path


def summary(report: dict[str, Any]) -> str:
    env = report["sections"].get("env", {}).get("result", {})
    lines = [
        "# hmlm gpu-check",
        "",
        f"GPU: {env.get('gpu', 'none')}; torch {env.get('torch', '?')} (CUDA {env.get('cuda_version')}); "
        f"triton {env.get('triton', '?')}; commit {env.get('commit')}; mode {report['mode']}",
        "",
        f"Data: {report.get('data', PREPARE)}",
        "",
        "| section | status | seconds | limit |",
        "|---|---|---|---|",
    ]
    for name, section in report["sections"].items():
        status = section["status"] + (f": {section['error']}" if section.get("error") else "")
        lines.append(f"| {name} | {status.replace('|', '/')} | {section.get('seconds', '-')} | "
                     f"{section.get('limit_s', '-')} |")  # fmt: skip
    tests = report["sections"].get("tests", {}).get("result", {})
    if tests:
        lines += ["", f"Tests (`{tests.get('command')}`): {tests.get('counts')}"]
    launches = report["sections"].get("launches", {}).get("result", {})
    if launches:
        lines += ["", "Kernel launches per training step:", ""]
        lines += ["| HMLM_KERNELS, precision | model | dispatched | GPU kernels | launch calls | graph launches |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for kernels, part in launches.items():
            for label, c in part.get("per_train_step", {}).items():
                lines.append(f"| {kernels} | {label} | {c.get('dispatched', 0):,} | {c['gpu_kernels']:,} | "
                             f"{c['launch_calls']:,} | {c['graph_launches']:,} |")  # fmt: skip
    bench = report["sections"].get("bench", {}).get("result", {}).get("runs", [])
    if bench:
        lines += ["", "Training / inference chars/s (ratio to nn.LSTM of the same run):", ""]
        lines += ["| shape | precision | HMLM_KERNELS | model | train | infer |", "|---|---|---|---|---|---|"]
        for run in bench:
            variant = run.get("variant") or run
            where = f"| {variant.get('shape')} | {variant.get('precision')} | {variant.get('kernels')} |"
            if "results" not in run:
                lines.append(f"{where} - | {run.get('skipped') or 'error'} | |")
                continue
            ratios = run["ratios"]
            for key, r in run["results"].items():
                ratio = ratios.get(f"{key}/lstm", {})
                train = f"{r['train_chars_per_s']:,.0f}" + (f" ({ratio['train']:.2f}x)" if ratio else "")
                infer = f"{r['infer_chars_per_s']:,.0f}" + (f" ({ratio['infer']:.2f}x)" if ratio else "")
                lines.append(f"{where} {r['label']} | {train} | {infer} |")
    run = report["sections"].get("eval", {}).get("result", {})
    if run and "error" not in run:
        lines += ["", f"enwik8 prefix: {run['steps']} steps in {run['train_seconds']} s ({run['train_chars_per_s']:,} "
                  f"chars/s); test bpc {run['test_bpc']:.4f} over {run['test_tokens']:,} tokens; "
                  f"{run['eval_symbols']:,} symbols evaluated in {run['eval_seconds']} s",
                  "", f"sample: {run['sample_prompt']!r} -> {run['sample']!r}"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
    parser.add_argument("--data-dir", type=Path, default=Path("gpu-data"))
    parser.add_argument(
        "--budget", type=float, default=BUDGET, help=f"seconds for the whole check (default {BUDGET:g})"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny versions of every section, on the CPU")
    # The eval section's child process:
    parser.add_argument("--eval-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--eval-symbols", type=int, default=5_000_000, help=argparse.SUPPRESS)
    parser.add_argument("--sample-length", type=int, default=200, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.eval_run is not None:
        print(json.dumps(evaluate_run(args.eval_run, args.device, args.eval_symbols, args.sample_length)))
        return 0

    started = time.monotonic()
    deadline = started + args.budget
    plan = smoke_plan(args.budget) if args.cpu_smoke else gpu_plan(args.budget)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = (out / "smoke-data") if args.cpu_smoke else args.data_dir.resolve()
    found = args.cpu_smoke or (data_dir / "enwik8" / "train.bin").exists()
    data = f"{PREPARE}: {'found' if found else 'NOT FOUND'} in {data_dir}" + (" (smoke: synthetic)" * args.cpu_smoke)
    print(f"gpu-check: {data}", file=sys.stderr, flush=True)
    report: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "budget_s": args.budget, "data": data,
                              "sections": {}}  # fmt: skip
    sections = {
        "env": lambda limit: section_env(plan, limit),
        "launches": lambda limit: section_launches(plan, limit, deadline),
        "bench": lambda limit: section_bench(plan, limit, deadline),
        "enwik8": lambda limit: section_enwik8(plan, limit, data_dir, out),
        "eval": lambda limit: section_eval(plan, limit, out),
        "tests": lambda limit: section_tests(plan, limit),
    }
    assert list(sections) == list(plan.limits), "every section has its limit, in order"
    for name, run in sections.items():
        remaining = deadline - time.monotonic()
        limit = min(plan.limits[name], remaining)
        entry: dict[str, Any] = {"limit_s": round(limit, 1)}
        if limit < 10:
            entry |= {"status": "skipped", "error": "time budget spent"}
        else:
            section_started = time.monotonic()
            try:
                entry["result"] = run(limit)
                entry["status"] = "ok" if not failed(entry["result"]) else "failed"
            except Exception as error:  # the report must survive any one section
                entry |= {"status": "error", "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc(limit=-3)}  # fmt: skip
            entry["seconds"] = round(time.monotonic() - section_started, 1)
        report["sections"][name] = entry
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        path = write_report(out, report)
        print(f"gpu-check: {name}: {entry['status']} ({entry.get('seconds', 0)} s of {entry['limit_s']} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    print(f"gpu-check: report in {path}")
    return 0


def failed(result: dict[str, Any]) -> bool:
    """Whether a section's own result says something failed (a non-zero exit, a timeout, an error)."""
    if result.get("error") or result.get("timed_out") or result.get("rc") not in (None, 0):
        return True
    if result.get("counts", {}).get("failed") or result.get("counts", {}).get("errors"):
        return True
    parts = result.get("runs", []) + [v for v in result.values() if isinstance(v, dict)]
    return any(isinstance(part, dict) and "error" in part for part in parts)


if __name__ == "__main__":
    sys.exit(main())
