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
there is none). Beside it, for the fast path, the estimate of hmlm/training/memory.py of the same figure.

On CUDA (`--precision`, `--models graph`, `--launches`):
- Every model runs under the same numeric settings, train.precision's (hmlm/precision.py): `fp32` lets cuBLAS and
  cuDNN alike use TF32 (torch's default leaves it on for cuDNN only, which favours nn.LSTM), `fp32-strict` turns
  it off for both, `bf16` autocasts both (TF32 on for what stays fp32). Under bf16 autocast torch runs cuDNN's
  LSTM in float16, not bfloat16: the report says which dtype it saw, and float16 training gets a GradScaler (as
  it needs, to be numerically safe), whose scaling and inf check count in nn.LSTM's time.
- `graph`: the HM-LSTM fast path with its training step captured as one CUDA graph (hmlm/training/cuda_graph.py: the
  Trainer's step, so it also computes the gradient norm, clips at train.grad_clip 1.0 and a finite flag, which the
  other training steps here do not) and its inference forward captured (which adds the cross entropy).
- `--launches`: kernel launches of one training step, from the torch profiler: GPU kernels executed, and the
  host's launch calls (cudaLaunchKernel and kin; cudaGraphLaunch counted apart).

`--launches` on the CPU too: what the step would launch on CUDA, by dispatch counting (hmlm/bench/launches.py: the aten
operators that launch a kernel, and one per fused-kernel call); on CUDA beside the profiler's figures. The count
does not depend on the sizes, so a small batch gives the figure of a large one. `--precision bf16` is accepted on
the CPU for this count alone (CPU autocast; with HMLM_KERNELS=triton the kernels run interpreted, as CUDA runs
them compiled, and the count is CUDA's arrangement). The training step is the Trainer's: forward, loss, backward,
gradient clipping at 1.0 (train.grad_clip's default) and Adam with foreach kernels (CUDA's default).
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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from hmlm.bench.launches import count_launches, sync
from hmlm.devices import resolve_device
from hmlm.errors import UserError
from hmlm.fast import kernels
from hmlm.model import CharLM, ModelConfig
from hmlm.precision import apply_precision, uses_tf32
from hmlm.training.memory import MemoryShape, estimate, format_bytes


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
    # text8's model with enwik8's 205 byte symbols: configs/enwik8.yaml (make gpu-check counts its launches)
    "enwik8": Shape(batch=128, seq_len=100, embed=128, hidden=1024, layers=3, out_embed=2048, vocab=205),
}
DEFAULT_SHAPE = {"cpu": "small", "cuda": "ptb"}  # about a minute of benchmarking on either with the default steps
DEFAULT_STEPS = {"cpu": 10, "cuda": 20}
MODELS = {  # key: (label, model kind, HMLSTM implementation)
    "fast": ("HM-LSTM fast", "hmlstm", "fast"),
    "reference": ("HM-LSTM reference", "hmlstm", "reference"),
    "lstm": ("nn.LSTM", "lstm", None),
    "graph": ("HM-LSTM fast + graph", "hmlstm", "fast"),  # CUDA only: the step captured as one CUDA graph
}
PRECISIONS = ("fp32", "fp32-strict", "bf16")  # train.precision's (hmlm/precision.py), less fp64
GRAD_CLIP = 1.0  # train.grad_clip's default: every training step here clips, as the Trainer's does


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

    def __init__(
        self, key: str, shape: Shape, layer_norm: bool, device: torch.device, seed: int, precision: str = "fp32"
    ):
        torch.manual_seed(seed)
        self.model = build_model(key, shape, layer_norm, device)
        # foreach: a few kernels for all parameters, as Adam runs on CUDA by default (the CPU's default loops)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, foreach=True)
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len + 1), generator=generator).to(device)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.device = device
        self.autocast = torch.bfloat16 if precision == "bf16" else None
        self.scaler = None
        self.lstm_dtype: str | None = None  # what cuDNN's LSTM ran in under autocast
        if self.autocast is not None and MODELS[key][1] == "lstm":
            self.lstm_dtype = str(self.probe_lstm_dtype()).removeprefix("torch.")
            if self.lstm_dtype == "float16":  # float16 gradients underflow without loss scaling
                self.scaler = torch.amp.GradScaler(device.type)
        self.graph = self.eval_graph = None
        if key == "graph":
            from hmlm.graphs import capture_eval
            from hmlm.training.cuda_graph import CudaGraphReplay, GraphTrainStep

            self.graph = GraphTrainStep(self.model, self.optimizer, 1.0, self.autocast, device, "on",
                                        replay_factory=CudaGraphReplay)  # fmt: skip
            self.model.eval()
            first = (self.inputs.cpu(), self.targets.cpu())
            self.eval_graph = capture_eval(self.model, tuple(self.inputs.shape), device, self.autocast, "on", first)

    def cast(self):
        return torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()

    def probe_lstm_dtype(self) -> torch.dtype:
        seen = []
        hook = self.model.lstm.register_forward_hook(lambda module, args, out: seen.append(out[0].dtype))
        with torch.no_grad(), self.cast():
            self.model(self.inputs[:, :2])
        hook.remove()
        return seen[0]

    def train_step(self) -> None:
        self.model.train()
        if self.graph is not None:
            self.graph.step(self.inputs, self.targets, 1.0, None)  # None: the zero state, as the others start from
            return
        with self.cast():
            logits = self.model(self.inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)  # as the Trainer's step (no host read)
        self.optimizer.step()

    @torch.no_grad()
    def infer_step(self) -> None:
        self.model.eval()
        if self.eval_graph is not None:
            self.eval_graph.run(self.inputs, self.targets, None)
            return
        with self.cast():
            self.model(self.inputs)

    def timed(self, step) -> float:
        sync(self.device)
        start = time.perf_counter()
        step()
        sync(self.device)
        return time.perf_counter() - start


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
    precision: str = "fp32",
    launches: bool = False,
) -> dict:
    """Run the benchmark and return its results as plain data (what `--json` prints)."""
    dev = resolve_device(device)
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if dev.type != "cuda" and precision == "bf16" and not launches:
        raise UserError(
            "--precision bf16 is for CUDA; on the CPU it only goes with --launches (to count what a bf16 step "
            "launches), else use --precision fp32"
        )
    unknown = [key for key in models if key not in MODELS]
    if unknown or not models:
        what = f"unknown {', '.join(unknown)}" if unknown else "none named"
        raise UserError(f"--models: {what}; choose from {', '.join(MODELS)}")
    if "graph" in models and dev.type != "cuda":
        raise UserError("--models graph (a captured CUDA graph) needs --device cuda")
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
    restore_tf32 = apply_precision(precision, dev)  # for every model alike; as it was again when done
    runners = {key: Runner(key, shape, layer_norm, dev, seed, precision) for key in models}
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
    counts = {key: count_launches(runners[key].train_step, dev) for key in models} if launches else {}

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
            "estimated_memory_bytes": estimated_memory(key, shape, layer_norm, dev, precision),
        }
        if key in counts:
            results[key]["launches_per_train_step"] = counts[key]
    lstm_dtype = runners["lstm"].lstm_dtype if "lstm" in runners else None
    mm_dtype = torch.bfloat16 if precision == "bf16" else None  # the fast path's matmuls (autocast)
    restore_tf32()
    return {
        "shape": {"name": shape_name, **asdict(shape)},
        "device": describe_device(dev),
        "layer_norm": layer_norm,
        "warmup_rounds": warmup,
        "measured_rounds": steps,
        "torch": torch.__version__,
        # what the fast path's elementwise work ran on: a backend of hmlm/kernels (triton, cpu or torch)
        "fast_kernels": kernels.select(dev, torch.float32, mm_dtype),
        "fast_kernels_detail": kernels.describe(dev, torch.float32, mm_dtype),
        "kernels_env": os.environ.get("HMLM_KERNELS"),  # the kernel backend asked for, if any
        "precision": precision,
        "tf32": uses_tf32(precision, dev),
        "lstm_autocast_dtype": lstm_dtype,  # under bf16: what cuDNN's LSTM ran in (float16 gets a GradScaler)
        "results": results,
        "ratios": ratios(results),
    }


def estimated_memory(key: str, shape: Shape, layer_norm: bool, dev: torch.device, precision: str) -> int | None:
    """hmlm/training/memory.py's estimate of what `peak_memory_bytes` measures, for the fast path (None for the others):
    on the CPU the first step's rise, on CUDA the peak of a step with the model and Adam's state allocated."""
    if MODELS[key][2] != "fast":
        return None
    config = build_config(key, shape, layer_norm)
    backend = kernels.select(dev, torch.float32)
    est = estimate(MemoryShape(config, shape.vocab, shape.batch, shape.seq_len, precision, kernels=backend))
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
    code = "from hmlm.bench.throughput import Shape, peak_rss_rise; "
    code += f"print(peak_rss_rise({key!r}, {shape!r}, {layer_norm!r}))"
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
        *precision_lines(report),
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
    lines += launch_lines(results)
    if "fast/reference" in report["ratios"]:
        ratio = report["ratios"]["fast/reference"]
        lines += ["", f"fast path vs reference: train {ratio['train']:.2f}x, inference {ratio['infer']:.2f}x"]
    return "\n".join(lines)


def precision_lines(report: dict) -> list[str]:
    if report.get("precision", "fp32") == "fp32" and report["device"]["type"] != "cuda":
        return []
    line = f"precision: {report['precision']} (TF32 {'on' if report['tf32'] else 'off'} for cuBLAS and cuDNN)"
    if report.get("lstm_autocast_dtype"):
        scaler = ", with a GradScaler" if report["lstm_autocast_dtype"] == "float16" else ""
        line += f"; nn.LSTM ran in {report['lstm_autocast_dtype']} under autocast{scaler}"
    return [line]


def launch_lines(results: dict) -> list[str]:
    counted = {key: r["launches_per_train_step"] for key, r in results.items() if "launches_per_train_step" in r}
    if not counted:
        return []
    header = f"{'per training step':20s} {'dispatched':>11s} {'GPU kernels':>12s} {'launch calls':>13s}"
    lines = ["", header + f" {'graph launches':>15s} {'aten ops':>9s}"]
    for key, c in counted.items():
        lines.append(
            f"{results[key]['label']:20s} {c['dispatched']:11,d} {c['gpu_kernels']:12,d} {c['launch_calls']:13,d}"
            f" {c['graph_launches']:15,d} {c['aten_ops']:9,d}"
        )
    lines.append(
        "(dispatched: kernel launches counted by dispatch, hmlm/bench/launches.py; the rest from the profiler)"
    )
    return lines


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)
