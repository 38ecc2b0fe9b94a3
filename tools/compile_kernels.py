"""Compile every Triton kernel variant that hmlm launches, for real GPU targets, on a machine without a GPU.

Triton's interpreter (how the tests run the kernels on the CPU) executes them as Python and accepts code that the
compiler rejects. This check compiles them as a user's GPU would:

1. Record. hmlm's own forward, backward and evaluation run at the shape of configs/enwik8.yaml (its model, a
   batch of 2 over 2 steps) with HMLM_KERNELS=triton, interpreted on the CPU, and hmlm.fast.kernels.triton records what
   each launch hands its kernel, as Triton specializes on it (argument types, 16-byte alignment, integers' values
   divisible by 16 or equal to 1, constexprs, warps). Covered: float32 and float64; step, soft and sample
   boundaries; the slope as a number and as a tensor; training (forward and backward) and evaluation without
   gradients, batched and one stream; bf16 autocast; and what the CUDA-graph regions (hmlm/training/cuda_graph.py)
   launch under capture (rehearsed on the CPU: hmlm.devices.rehearsing_capture). The seed's cell (model.cell: seed)
   adds its own variants (SEED): in float32 with step boundaries, training and batched evaluation only, since SEED
   changes only the boundary's lines, which those variants compile. The list comes from the code that launches, so
   it cannot drift from it.
2. Compile each distinct variant for each target (default sm_80, an A100, and sm_90, an H100; `--jobs` at a time) with
   `triton.compile`, as Triton's launcher would (its own argument specialization, through a backend made for the
   target), whose last stage runs the ptxas that Triton ships with `-v`: its log gives registers, spills and
   shared memory per kernel. Any compile error fails the check; so does a register spill on sm_90 in float32.

It binds the launcher's argument specialization through Triton internals (triton.runtime.jit), so it is pinned
to the Triton versions it is tested with (TESTED) and says why it cannot run on others (exit 3); `make test`
runs it (tests/test_compile_kernels.py), where CI makes that a failure, not a skip.

    python tools/compile_kernels.py [--targets 80,90] [--json FILE] [--launches FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's hmlm, in this process and (PYTHONPATH) the recorder's
TESTED = ("3.6", "3.9")  # Triton versions (major.minor) this check is tested with
UNTESTED_EXIT = 3  # exit status where the installed Triton is not among them
BATCH, STEPS = 2, 2  # a first step (from the initial state) and one after it
CONFIG = ROOT / "configs" / "enwik8.yaml"


# --- 1. Record (in a process where the kernels are interpreted) -------------------------------------------------


def record() -> list[dict]:
    """Every distinct launch of hmlm's training, evaluation and captured regions, as plain data."""
    import torch
    import torch.nn.functional as F

    from hmlm import CharLM
    from hmlm.config import load_config
    from hmlm.devices import rehearsing_capture
    from hmlm.fast import kernels
    from hmlm.graphs import EvalGraph
    from hmlm.training.cuda_graph import StaticStep

    module, why = kernels.load_triton()
    if module is None or not module.INTERPRETED:
        raise SystemExit(f"the Triton kernels must run interpreted to be recorded here: {why or module.MODE}")
    cpu = torch.device("cpu")
    seen: dict = {}

    def keep(launches) -> None:
        for launch in launches:
            seen.setdefault(launch, None)

    def train_and_evaluate(model, x, y, slope, one_stream: bool = True) -> None:
        model.train()
        logits = model(x, None, slope).logits
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        model.eval()
        with torch.no_grad():
            model(x, None, slope)
            if one_stream:
                model(x[:1], None, slope)  # one stream, as `hmlm sample` runs on CUDA

    config = load_config(CONFIG).model
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = CharLM(205, config).to(dtype)
        for mode in ("step", "soft", "sample"):
            model.rnn.boundary_mode = mode  # as model.boundary in the config would make it
            tokens = torch.randint(0, 205, (BATCH, STEPS + 1))
            x, y = tokens[:, :-1], tokens[:, 1:]
            casts = [None, torch.bfloat16] if dtype == torch.float32 else [None]
            for slope in (1.5, torch.tensor(1.5, dtype=dtype)):
                for cast in casts:
                    with (
                        module.recording() as launches,
                        torch.autocast("cpu", torch.bfloat16, enabled=cast is not None),
                    ):
                        train_and_evaluate(model, x, y, slope)
                    keep(launches)
            # The captured regions, as a capture runs them (their warm-up runs them plainly: above).
            for cast in casts:
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                model.train()
                static = StaticStep(model, optimizer, 1.0, cast, (BATCH, STEPS), cpu)
                static.load_step(x, y, 1.5, None)
                evaluation = EvalGraph(model, (BATCH, STEPS), cpu, cast)
                with module.recording() as launches, rehearsing_capture():
                    static.eager()
                    model.eval()
                    with torch.no_grad():
                        evaluation.load(x, y, None)
                        evaluation._compute()
                keep(launches)
    # The seed's cell: a few variants more (the module docstring), not every one above again with SEED.
    torch.manual_seed(0)
    model = CharLM(205, replace(config, cell="seed"))
    tokens = torch.randint(0, 205, (BATCH, STEPS + 1))
    with module.recording() as launches:
        train_and_evaluate(model, tokens[:, :-1], tokens[:, 1:], 1.5, one_stream=False)
    keep(launches)
    return [asdict(launch) for launch in seen]


# --- 2. Compile (in a process where the kernels are Triton's JIT functions) ------------------------------------


@dataclass
class Compiled:
    kernel: str
    target: str
    variant: dict  # the constexprs and warps that tell variants apart, and the dtype
    ok: bool
    error: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0


class MockTensor:
    """What Triton's argument specialization reads of a tensor: its dtype and address."""

    def __init__(self, dtype, address: int):
        self.dtype, self.address = dtype, address

    def data_ptr(self) -> int:
        return self.address

    def ptr_range(self) -> int:
        return 0


PTXAS_LINE = re.compile(r"Used (\d+) registers")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
SHARED = re.compile(r"(\d+) bytes smem")


@dataclass
class Variant:
    """One kernel specialization for one target, as Triton's launcher would compile it."""

    kernel: object  # the JIT function
    target: object  # triton's GPUTarget
    signature: dict
    constants: dict
    attrs: dict
    options: object
    summary: dict  # the constexprs and warps that tell variants apart, and the dtype

    @property
    def key(self) -> str:
        return repr((self.kernel.__name__, self.target, self.signature, self.constants, self.attrs, self.options))


def specialize(launch: dict, capability: int) -> Variant:
    """What Triton's launcher makes of a recorded launch on this target: its own argument specialization, through
    a backend made for the target (triton.runtime.jit's binder, as JITFunction.run uses it)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from hmlm.fast.kernels import triton_kernels as kernels_module

    kernel = getattr(kernels_module, launch["kernel"])
    args, constexprs, dtypes = [], {}, []
    for name, kind, value in launch["args"]:
        if kind == "tensor":
            dtype_name, address = value.split(":")
            args.append(MockTensor(getattr(torch, dtype_name), int(address)))
            dtypes.append(dtype_name)
        elif kind == "constexpr":
            constexprs[name] = value
        else:
            args.append(value)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**constexprs, "num_warps": launch["num_warps"]}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constants, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    # The state's dtype (that of every tensor but the matmuls' bf16 operands), and "+bf16" where there are those.
    dtype = next((d for d in dtypes if d != "bfloat16"), dtypes[0]) + ("+bf16" if "bfloat16" in dtypes else "")
    summary = {**constexprs, "num_warps": launch["num_warps"], "dtype": dtype}
    return Variant(kernel, target, signature, constants, attrs, options, summary)


def compile_launch(launch: dict, capability: int) -> Compiled:
    return compile_variant(specialize(launch, capability))


def compile_variant(variant: Variant) -> Compiled:
    import triton
    from triton.compiler import ASTSource

    name, target = variant.kernel.__name__, f"sm_{variant.target.arch}"
    result = Compiled(name, target, variant.summary, ok=False)
    start = time.perf_counter()
    try:
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: Triton prints its own `ptxas -v` log
            source = ASTSource(variant.kernel, variant.signature, variant.constants, variant.attrs)
            triton.compile(source, target=variant.target, options=variant.options.__dict__)
        read_ptxas_log(result, log.getvalue())
        result.ok = result.registers is not None
        result.error = "" if result.ok else "no `ptxas -v` log from Triton's build"
    except Exception as error:  # a compile error: what a user's GPU would say
        result.error = first_lines(error)
    result.seconds = time.perf_counter() - start
    return result


def read_ptxas_log(result: Compiled, log: str) -> None:
    """Registers, spills and shared memory, from the `ptxas -v` log of Triton's own build of the kernel."""
    registers, spills, shared = PTXAS_LINE.search(log), SPILLS.search(log), SHARED.search(log)
    result.registers = int(registers.group(1)) if registers else None
    result.spill_stores, result.spill_loads = (int(spills.group(1)), int(spills.group(2))) if spills else (None, None)
    result.shared_bytes = int(shared.group(1)) if shared else 0


def first_lines(error: Exception) -> str:
    lines = [line.rstrip() for line in str(error).splitlines() if line.strip()]
    message = next((line for line in lines if "error" in line.lower() or "mismatch" in line.lower()), None)
    return f"{type(error).__name__}: {message or (lines[0] if lines else '')}".strip()


# --- The check ---------------------------------------------------------------------------------------------------


def triton_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:
        return None


def run_recorder() -> list[dict]:
    """Step 1 in a child process: Triton decides on interpreting when it is imported, and this process compiles."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "HMLM_KERNELS": "triton", "PYTHONPATH": str(ROOT)}
    env.pop("HMLM_FUSED", None)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--record"], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise SystemExit(f"recording the launches failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--json", type=Path, help="write every result here as JSON")
    parser.add_argument(
        "--launches", type=Path, help="the recorded launches: read from this file if it exists, else recorded into it"
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiles at a time (default 2)")
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)  # step 1, run by step 2
    args = parser.parse_args(argv)
    if args.record:
        print(json.dumps(record()))
        return 0

    version = triton_version()
    if version is None:
        print("compile check: triton is not installed (pip install -e .[dev] installs it)", file=sys.stderr)
        return UNTESTED_EXIT
    if ".".join(version.split(".")[:2]) not in TESTED:
        print(f"compile check: Triton {version} is not among the versions it is tested with ({', '.join(TESTED)}): "
              "it binds Triton internals; test it there and add the version to TESTED", file=sys.stderr)  # fmt: skip
        return UNTESTED_EXIT
    try:
        capabilities = [int(c) for c in args.targets.split(",")]
    except ValueError:
        print(f"--targets takes compute capabilities such as 80,90, not {args.targets!r}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"--jobs must be at least 1, not {args.jobs}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    os.environ["TRITON_INTERPRET"] = "0"  # before hmlm.fast.kernels.triton imports triton: JIT functions, not Python
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton runs ptxas with -v; this prints the log (read_ptxas_log)
    if args.launches is not None and args.launches.exists():
        launches = json.loads(args.launches.read_text())
    else:
        launches = run_recorder()
        if args.launches is not None:
            args.launches.write_text(json.dumps(launches))
    recorded = time.perf_counter() - start
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # the default, as a user's launch has it
    # Distinct specializations: launches that differ only in values Triton does not specialize on (a stride of 4097
    # or 4099) compile once. Each is compiled in a worker process, `--jobs` at a time.
    distinct: dict[str, tuple[dict, int]] = {}
    for capability in capabilities:
        for launch in launches:
            distinct.setdefault(specialize(launch, capability).key, (launch, capability))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile every time, not from an earlier run's cache
        context = multiprocessing.get_context("fork")  # the workers inherit this process's imports and settings
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            results = list(pool.map(compile_launch, *zip(*distinct.values(), strict=True)))
    total = time.perf_counter() - start

    print(f"Triton {version}: {len(launches)} distinct launches recorded in {recorded:.0f} s; {len(results)} kernel "
          f"variants to compile for {', '.join(f'sm_{c}' for c in capabilities)}:")  # fmt: skip
    print(f"{'kernel':16s} {'target':7s} {'dtype':13s} {'variant':52s} {'regs':>5s} {'spills':>7s} {'smem':>6s}")
    for r in sorted(results, key=lambda r: (r.kernel, r.target, r.variant["dtype"], str(r.variant))):
        flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r.variant.items() if k != "dtype")
        if r.ok:
            spills = f"{r.spill_stores}/{r.spill_loads}"
            print(f"{r.kernel:16s} {r.target:7s} {r.variant['dtype']:13s} {flags:52s} {r.registers:5d} {spills:>7s}"
                  f" {r.shared_bytes:6d}")  # fmt: skip
        else:
            print(f"{r.kernel:16s} {r.target:7s} {r.variant['dtype']:13s} {flags:52s} FAILED: {r.error}")
    failed = [r for r in results if not r.ok]
    spilled = [
        r
        for r in results
        if r.ok and r.target == "sm_90" and r.variant["dtype"].startswith("float32") and r.spill_stores
    ]
    print(f"{len(results) - len(failed)} of {len(results)} compiled; {len(spilled)} spill on sm_90 in float32; "
          f"{total:.0f} s in all")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"triton": version, "seconds": total, "results": [asdict(r) for r in results]},
                                        indent=1))  # fmt: skip
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
