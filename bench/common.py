"""What the benchmarks, the tuner and the tests share: the real ViT attention shapes, one benchmark
case, the dtype names, the accuracy rule's floor, the median timers, and the two ways a call is
timed (``Timing``): eagerly, as a model makes it (GPU work plus whatever host time the GPU waits
for), and replayed from a CUDA graph (the GPU work alone)."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from adclr.kernels import AttentionLayout, plans

# name -> (batch, heads, R, Q, head_dim): ViT-S/16 global 224 px, its 96 px local crops, ViT-B/16, ViT-S/8.
VIT_SHAPES = {
    "vit_s16_global": (128, 6, 197, 10, 64),
    "vit_s16_local96": (512, 6, 37, 10, 64),
    "vit_b16_global": (64, 12, 197, 10, 64),
    "vit_s8_global": (32, 6, 785, 10, 64),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Additive floor on top of the accuracy rule "error against the truth at most 2x PyTorch's own in the
# same dtype": one unit in the last place at magnitude 1, so that an exact-zero PyTorch error (L = 1,
# say) does not demand bit-exactness. Used by the tests and by the tuner's gate alike.
ERROR_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call: ``batch x heads`` sequences of ``num_raw + num_query`` tokens under the
    layout named ``rule`` (a query-key rule or ``bidirectional``; one prefix token), in ``dtype``."""

    shape: str
    batch: int
    heads: int
    num_raw: int
    num_query: int
    head_dim: int
    rule: str
    dtype: str

    @property
    def layout(self) -> AttentionLayout:
        return AttentionLayout.named(self.rule, self.num_raw, self.num_query)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> plans.ShapeKey:
        """The tuned table's key of this call."""
        layout = self.layout
        return plans.shape_key(layout.length, self.head_dim, self.torch_dtype, layout.kernel_params)

    def label(self) -> str:
        return f"{self.shape} {self.rule} {self.dtype}"


def median_ms(fn, device, grad_to_none=None, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn``: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed
    between repetitions, ``warmup`` / ``rep`` in ms); on CPU two wall-clock repeats after one warm-up
    call (the smoke runs time the harness, not the kernels)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


MIN_REPS = 50  # timed repetitions per candidate on a GPU (do_bench's 10 ms gave the L = 795 backward 3)
CPU_REPS = 2  # CPU smoke runs time the harness, not the kernels


def interleaved_ms(fns: dict, device, reps: int = MIN_REPS, grad_to_none=None) -> dict:
    """Median milliseconds of each of ``fns`` (name -> callable), all timed in one interleaved run:
    repetition r calls every function once, the order rotated by r, so that a clock or temperature
    drift during the run biases none of them. On CUDA each call is bracketed by CUDA events with the
    L2 cache flushed before it (as ``triton.testing.do_bench``), ``reps`` repetitions after one
    warm-up call each; on CPU ``CPU_REPS`` wall-clock repetitions. ``grad_to_none``: tensors whose
    ``.grad`` is reset before each call."""
    names = list(fns)
    cuda = torch.device(device).type == "cuda"
    reps = reps if cuda else CPU_REPS

    def call(name):
        for t in grad_to_none or ():
            t.grad = None
        fns[name]()

    for name in names:
        call(name)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if cuda else None
    samples = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if cuda:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call(name)
                end.record()
                samples[name].append((start, end))
            else:
                begin = time.perf_counter()
                call(name)
                samples[name].append((time.perf_counter() - begin) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        samples = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in samples.items()}
    return {name: statistics.median(times) for name, times in samples.items()}


def warm_until_stable(device, max_s: float = 15.0, tolerance: float = 0.02, log=print) -> float:
    """Keep the GPU busy with bf16 matrix products until three consecutive batches take the same time
    within ``tolerance`` (an idle card sits at a low clock and ramps up under load), at most ``max_s``
    seconds; returns the seconds spent (0 on CPU)."""
    if torch.device(device).type != "cuda":
        return 0.0
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=device)
    begin = time.perf_counter()
    batches = []
    while time.perf_counter() - begin < max_s:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ a
        end.record()
        end.synchronize()
        batches.append(start.elapsed_time(end))
        last = batches[-3:]
        if len(last) == 3 and max(last) <= min(last) * (1 + tolerance):
            break
    spent = time.perf_counter() - begin
    log(f"GPU warm-up: {spent:.1f} s, {len(batches)} batches, last {batches[-1]:.2f} ms", flush=True)
    return spent


# --------------------------------------------------------------------------------------------------
# GPU time apart from the Python path: CUDA-graph replay
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """One call timed two ways. ``eager_ms``: the call as made, CUDA events around it (the GPU work,
    plus the host time the GPU sat waiting for: the Python path, Triton's launcher). ``graph_ms``:
    the same call captured once in a CUDA graph and replayed (the GPU work alone), None where it could
    not be captured (``note`` says why). Decisions use ``gpu_ms``, the graph time where there is one,
    else the eager time; ``python_ms`` is what the host adds, eager minus graph."""

    eager_ms: float
    graph_ms: float | None
    note: str = ""

    @property
    def gpu_ms(self) -> float:
        return self.eager_ms if self.graph_ms is None else self.graph_ms

    @property
    def python_ms(self) -> float:
        return math.nan if self.graph_ms is None else self.eager_ms - self.graph_ms

    @property
    def source(self) -> str:
        """``graph``, or ``eager (why there is no graph time)``: the timing column of the reports."""
        return "graph" if self.graph_ms is not None else f"eager ({self.note})"

    def columns(self) -> dict:
        """The report columns: the decision time first."""
        return dict(ms=self.gpu_ms, eager_ms=self.eager_ms, python_ms=self.python_ms, timing=self.source)


def capture_graph(fn, device, grad_to_none=None):
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream, as PyTorch asks);
    the graph. ``grad_to_none``: leaves whose ``.grad`` is reset first, so the captured backward
    writes fresh gradients instead of accumulating. Raises on CPU and wherever capture fails."""
    if torch.device(device).type != "cuda":
        raise RuntimeError("no CUDA graphs on CPU")
    for t in grad_to_none or ():
        t.grad = None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
            for t in grad_to_none or ():
                t.grad = None
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _capture_or_why(fn, device, grad_to_none):
    """``(graph, "")``, or ``(None, why)`` when capture fails: a provider that cannot be captured is
    timed eagerly only, never the end of the run."""
    try:
        return capture_graph(fn, device, grad_to_none), ""
    except Exception as error:  # noqa: BLE001 - any capture failure means "eager timing only"
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        text = str(error).splitlines()[0][:120] if str(error) else ""
        return None, text if text == "no CUDA graphs on CPU" else f"capture failed: {type(error).__name__}: {text}"


def graph_ms(fn, device, grad_to_none=None, warmup: int = 10, rep: int = 50) -> tuple[float | None, str]:
    """``(median ms of replays of fn's CUDA graph, "")``, or ``(None, why not)``: replays timed as
    ``median_ms`` times a call (L2 flushed before each)."""
    graph, why = _capture_or_why(fn, device, grad_to_none)
    if graph is None:
        return None, why
    try:
        return median_ms(graph.replay, device, warmup=warmup, rep=rep), ""
    finally:
        del graph
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def time_calls(fns: dict, device, grad_to_none=None, reps: int = MIN_REPS) -> dict:
    """``{name: Timing}`` for each of ``fns``: eager times from one interleaved run
    (``interleaved_ms``), then graph times from a second one over the replays of every function that
    could be captured (each captured once, its leaves' grads reset first)."""
    eager = interleaved_ms(fns, device, reps=reps, grad_to_none=grad_to_none)
    graphs, notes = {}, {}
    for name, fn in fns.items():
        graphs[name], notes[name] = _capture_or_why(fn, device, grad_to_none)
    replays = {name: graph.replay for name, graph in graphs.items() if graph is not None}
    replayed = interleaved_ms(replays, device, reps=reps) if replays else {}
    del graphs, replays
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return {name: Timing(eager[name], replayed.get(name), notes[name]) for name in fns}
