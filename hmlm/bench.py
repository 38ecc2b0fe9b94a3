"""`hmlm bench`: training and inference throughput of the HM-LSTM against torch's own LSTM of the same size.

Three character language models of one shape are timed in one process, in interleaved rounds (the order
rotates every round), after warm-up rounds, and each figure is the median over the measured rounds:
- HM-LSTM, fast path (the default implementation),
- HM-LSTM, reference path (the readable step of cell.py under autograd),
- nn.LSTM of the same width and depth (cuDNN on CUDA), through CharLM(kind="lstm").
A training step is forward + cross-entropy + backward + Adam step; an inference step is a no_grad forward.
Throughput is characters per second, batch * seq_len / median step time. Ratios are against nn.LSTM measured in
the same run, which is what makes figures from different machines comparable.

Peak memory of a training step: torch.cuda.max_memory_allocated on CUDA; on the CPU, how far the first training
step raises the resident set size of a fresh process at its highest (sampled from /proc/self/statm; 'n/a' where
there is none). Beside it, for the fast path, the estimate of hmlm/memory.py of the same figure.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from hmlm import fused
from hmlm.errors import UserError
from hmlm.memory import MemoryShape, estimate, format_bytes
from hmlm.model import CharLM, ModelConfig


@dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    embed: int
    hidden: int
    layers: int
    out_embed: int
    vocab: int

    def describe(self) -> str:
        return (
            f"batch {self.batch}, seq {self.seq_len}, embed {self.embed}, {self.layers}x{self.hidden}, "
            f"out-embed {self.out_embed}, vocab {self.vocab}"
        )


SHAPES = {
    # The paper's models (section 4.1): PTB and text8. `small` is a quick check that fits a laptop CPU.
    "ptb": Shape(batch=64, seq_len=100, embed=128, hidden=512, layers=3, out_embed=512, vocab=50),
    "text8": Shape(batch=128, seq_len=100, embed=128, hidden=1024, layers=3, out_embed=2048, vocab=27),
    "small": Shape(batch=32, seq_len=100, embed=128, hidden=128, layers=3, out_embed=128, vocab=50),
}
DEFAULT_SHAPE = {"cpu": "small", "cuda": "ptb"}  # about a minute of benchmarking on either with the default steps
DEFAULT_STEPS = {"cpu": 10, "cuda": 20}
MODELS = {  # key: (label, model kind, HMLSTM implementation)
    "fast": ("HM-LSTM fast", "hmlstm", "fast"),
    "reference": ("HM-LSTM reference", "hmlstm", "reference"),
    "lstm": ("nn.LSTM", "lstm", None),
}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device must be cpu, cuda or auto, not {device!r}")
    return torch.device(device)


def build_config(key: str, shape: Shape, layer_norm: bool) -> ModelConfig:
    return ModelConfig(
        kind=MODELS[key][1],
        embed_dim=shape.embed,
        hidden_sizes=[shape.hidden] * shape.layers,
        output_embed_dim=shape.out_embed,
        layer_norm=layer_norm,
    )


def build_model(key: str, shape: Shape, layer_norm: bool, device: torch.device) -> CharLM:
    impl = MODELS[key][2]
    model = CharLM(shape.vocab, build_config(key, shape, layer_norm)).to(device)
    if impl is not None:
        model.rnn.impl = impl
    return model


class Runner:
    """One model, its optimizer, and one fixed batch; times one training or inference step."""

    def __init__(self, key: str, shape: Shape, layer_norm: bool, device: torch.device, seed: int):
        torch.manual_seed(seed)
        self.model = build_model(key, shape, layer_norm, device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len + 1), generator=generator).to(device)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.device = device

    def train_step(self) -> None:
        self.model.train()
        logits = self.model(self.inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer_step(self) -> None:
        self.model.eval()
        self.model(self.inputs)

    def timed(self, step) -> float:
        sync(self.device)
        start = time.perf_counter()
        step()
        sync(self.device)
        return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    shape_name: str | None = None,
    device: str = "auto",
    steps: int | None = None,
    warmup: int = 2,
    layer_norm: bool = True,
    models: tuple[str, ...] = ("fast", "reference", "lstm"),
    memory: bool = True,
    batch: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    progress=None,
) -> dict:
    """Run the benchmark and return its results as plain data (what `--json` prints)."""
    dev = resolve_device(device)
    shape_name = shape_name or DEFAULT_SHAPE[dev.type]
    if shape_name not in SHAPES:
        raise UserError(f"--shape must be one of {', '.join(SHAPES)}, not {shape_name!r}")
    steps = steps if steps is not None else DEFAULT_STEPS[dev.type]
    if steps < 1:
        raise UserError(f"--steps must be at least 1, not {steps}")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, not {warmup}")
    shape = SHAPES[shape_name]
    if batch is not None or seq_len is not None:  # e.g. --seq-len 1: the one-symbol steps of sampling
        for name, value in (("--batch", batch), ("--seq-len", seq_len)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, not {value}")
        shape = replace(shape, batch=batch or shape.batch, seq_len=seq_len or shape.seq_len)
    runners = {key: Runner(key, shape, layer_norm, dev, seed) for key in models}
    times: dict[str, dict[str, list[float]]] = {key: {"train": [], "infer": []} for key in models}
    peak: dict[str, int | None] = {key: None for key in models}
    order = list(models)
    for round_ in range(warmup + steps):
        for key in order:
            runner = runners[key]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            train = runner.timed(runner.train_step)
            if dev.type == "cuda":
                peak[key] = max(peak[key] or 0, torch.cuda.max_memory_allocated(dev))
            infer = runner.timed(runner.infer_step)
            if round_ >= warmup:
                times[key]["train"].append(train)
                times[key]["infer"].append(infer)
        order = order[1:] + order[:1]  # nobody always runs first (or right after the same model)
        if progress is not None:
            progress(round_ + 1, warmup + steps)
    if memory and dev.type == "cpu":
        peak = {key: cpu_peak_memory(key, shape, layer_norm) for key in models}

    chars = shape.batch * shape.seq_len
    results = {}
    for key in models:
        train_s, infer_s = statistics.median(times[key]["train"]), statistics.median(times[key]["infer"])
        results[key] = {
            "label": MODELS[key][0],
            "train_chars_per_s": chars / train_s,
            "infer_chars_per_s": chars / infer_s,
            "train_step_s": times[key]["train"],
            "infer_step_s": times[key]["infer"],
            "peak_memory_bytes": peak[key],
            "estimated_memory_bytes": estimated_memory(key, shape, layer_norm, dev),
        }
    return {
        "shape": {"name": shape_name, **asdict(shape)},
        "device": describe_device(dev),
        "layer_norm": layer_norm,
        "warmup_rounds": warmup,
        "measured_rounds": steps,
        "torch": torch.__version__,
        # what the fast path's elementwise work ran on: the C++ kernels of hmlm/fused.py, or torch ops
        "fast_kernels": "fused" if fused.usable(dev, torch.float32) else "torch-ops",
        "fast_kernels_detail": fused.describe(dev, torch.float32),
        "results": results,
        "ratios": ratios(results),
    }


def estimated_memory(key: str, shape: Shape, layer_norm: bool, dev: torch.device) -> int | None:
    """hmlm/memory.py's estimate of what `peak_memory_bytes` measures, for the fast path (None for the others):
    on the CPU the first step's rise, on CUDA the peak of a step with the model and Adam's state allocated."""
    if MODELS[key][2] != "fast":
        return None
    config = build_config(key, shape, layer_norm)
    est = estimate(MemoryShape(config, shape.vocab, shape.batch, shape.seq_len, fused=fused.usable(dev, torch.float32)))
    if dev.type == "cuda":
        return est.parameters + est.gradients + est.optimizer + est.activations
    return est.first_step


def ratios(results: dict) -> dict:
    """Throughput ratios: every model against nn.LSTM, and the fast path against the reference."""
    pairs = [(key, "lstm") for key in results if key != "lstm"] + [("fast", "reference")]
    out = {}
    for a, b in pairs:
        if a in results and b in results:
            out[f"{a}/{b}"] = {
                phase: results[a][f"{phase}_chars_per_s"] / results[b][f"{phase}_chars_per_s"]
                for phase in ("train", "infer")
            }
    return out


def describe_device(dev: torch.device) -> dict:
    if dev.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(dev)}
    return {"type": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- CPU memory: the resident set size, sampled while a training step runs in a fresh process -------------------


def cpu_peak_memory(key: str, shape: Shape, layer_norm: bool) -> int | None:
    """Bytes by which the first training step raises the resident set size of a fresh process at its highest
    (a fresh one: in this process, memory freed by earlier steps stays mapped and hides the rise). Linux only;
    None elsewhere or if the child fails."""
    if resident_bytes() is None:
        return None
    code = f"from hmlm.bench import Shape, peak_rss_rise; print(peak_rss_rise({key!r}, {shape!r}, {layer_norm!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    try:
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
        return int(child.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def peak_rss_rise(key: str, shape: Shape, layer_norm: bool) -> int:
    """In the child: build the model, then sample the resident set size every half millisecond during one step."""
    runner = Runner(key, shape, layer_norm, torch.device("cpu"), seed=0)
    gc.collect()
    baseline = highest = resident_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal highest
        while not done.is_set():
            highest = max(highest, resident_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runner.train_step()
    done.set()
    sampler.join()
    return max(highest, resident_bytes()) - baseline


def resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# --- The report --------------------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    shape, dev, results = report["shape"], report["device"], report["results"]
    where = dev["name"] + (f", {dev['cores']} cores, {dev['threads']} threads" if dev["type"] == "cpu" else "")
    lines = [
        f"hmlm bench: shape {shape['name']} ({Shape(**{k: v for k, v in shape.items() if k != 'name'}).describe()}), "
        f"layer norm {'on' if report['layer_norm'] else 'off'}",
        f"device: {dev['type']} ({where}); torch {report['torch']}; "
        f"median of {report['measured_rounds']} interleaved rounds after {report['warmup_rounds']} warm-up",
        f"fast path: {report['fast_kernels_detail']}",
        "",
        f"{'':20s} {'train chars/s':>14s} {'vs LSTM':>8s} {'infer chars/s':>14s} {'vs LSTM':>8s} {'train memory':>13s}"
        f" {'estimate':>10s}",
    ]
    lstm = results.get("lstm")
    for r in results.values():
        vs = ["", ""]
        if lstm is not None:
            vs = [f"{r[f'{p}_chars_per_s'] / lstm[f'{p}_chars_per_s']:.2f}x" for p in ("train", "infer")]
        lines.append(
            f"{r['label']:20s} {r['train_chars_per_s']:14,.0f} {vs[0]:>8s} {r['infer_chars_per_s']:14,.0f} "
            f"{vs[1]:>8s} {format_bytes(r['peak_memory_bytes']):>13s}"
            f" {format_bytes(r.get('estimated_memory_bytes')):>10s}"
        )
    if "fast/reference" in report["ratios"]:
        ratio = report["ratios"]["fast/reference"]
        lines += ["", f"fast path vs reference: train {ratio['train']:.2f}x, inference {ratio['infer']:.2f}x"]
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)
