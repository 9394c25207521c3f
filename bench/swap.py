"""Swap benchmark: the real agent runtime swapping A↔B under constant inference load.

    python bench/swap.py --model-a A.tflite --model-b B.tflite --swaps 100 --json

A and B are any two models with the same tensor interface (the agent refuses
anything else): any number of inputs and outputs, any dtypes, quantized or
not, dynamic dimensions (sized as `ModelSlot.sample_inputs` sizes them). Every
call feeds every input with random values of its dtype and range
(`ModelSlot.sample_inputs`) and reads every output. Given the same file twice,
B is A with 64 zero bytes appended (`model_b_padded`): another file and sha256,
the same model, so that every deploy swaps. Without model files it generates
two heavy ones: a dense network of 9.5 MB whose invoke takes about 1 ms on the
2-vCPU machines here (3 ms on slower ones); `--batch 64` gives the same
weights four times the compute per invoke. In one run it measures:

* the bare baseline for the same files: read the file + build the interpreter
  + allocate + one invoke (load). The ratio's denominator
  (`baseline_load_ms_p50`) is a bare load of the same file right before each
  swap, under the same inference threads, so that baseline and swaps see the
  machine at the same moments; also measured idle and in a phase of its own
  under the bare invoke loop (`baseline_load_bare_threads_ms_p50`, with
  `baseline_load_max_gap_ms`: the longest pause of the bare inference threads
  while the bare loads run, what loading costs them with no agent at all);
* a bare invoke loop on the same number of threads, each with its own
  interpreter (throughput), and single-thread per-invoke latency (p50/p99).
  Throughput is compared in short paired rounds (bare and agent back to back,
  order alternating); the ratio is the median of the rounds' ratios, so a
  burst of load from another process skews one round, not the figure (the
  pooled ratio and the spread are printed too);
* the agent (`--threads` interpreters per model, like the bare loop):
  `Agent.handle(deploy)` for each swap (verify the signed manifest, map the
  stored file, load + warm up into the standby slot, check the tensor
  signature, swap, watch the first live inferences, persist the pointers)
  while `--threads` threads call `Agent.infer` non-stop. `max_gap_ms` is the
  longest pause between completed inferences that overlaps a swap
  (`swap_max_gap_ms_p50`: a typical swap's longest), and
  `baseline_load_inline_max_gap_ms` the longest pause of the same threads
  that overlaps one of the pre-swap bare loads: the floor loading a model sets
  on this machine, measured at the same moments. A bare load and the swap after
  it are `--settle-ms` apart, so that a pause is charged to the one that caused it.

By default each swap loads its model (the resident standby is dropped first,
the slow path); `--resident` measures the rollback-style swap to the model
still loaded. Models load and run through the LiteRT C API where it is
available (`engine`, see shared.tflite), the bare baseline too. The pre-swap
bare loads take turns with two references: the same load from the file mapped
instead of read (as the agent does: `baseline_load_mapped_ms_p50`) and the
Python interpreter's `Interpreter` + `allocate_tensors` + invoke
(`baseline_load_binding_ms_p50`); `--no-c-api` runs everything on the Python
interpreter. Prints one JSON object (or a summary) with the ratios. Does file
and thread I/O; no network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.agent import Agent, AgentConfig
from edge_agent.runtime import ModelSlot
from shared import tflite
from shared.logs import configure_logging
from shared.manifest import build_manifest, sign_manifest
from shared.messages import DeployCommand, ModelRef
from shared.model_builder import build_dense_model
from shared.settings import parse_mqtt_url
from shared.tflite import Interpreter, make_interpreter, read_signature, uses_c_api

HEAVY = {"input_size": 256, "hidden": (1024, 1024, 1024), "output_size": 10, "batch": 16}
# A call's inputs: the array of a single-input, single-output model (the agent's
# shorthand, what such an application passes), else the tuple in input order.
Call = np.ndarray | tuple[np.ndarray, ...]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def as_tuple(x: Call) -> tuple[np.ndarray, ...]:
    return (x,) if isinstance(x, np.ndarray) else x


def bare_ready(interp: Interpreter, x: Call) -> tuple[list[int], list[int]]:
    """Size `interp` for the inputs `x` (dynamic dimensions) and allocate it if need be:
    (input indices, output indices)."""
    xs = as_tuple(x)
    details = interp.get_input_details()
    ins = [int(d["index"]) for d in details]
    if any(tuple(d["shape"]) != v.shape for d, v in zip(details, xs, strict=True)):
        for i, v in zip(ins, xs, strict=True):
            interp.resize_tensor_input(i, v.shape, strict=True)
        interp.allocate_tensors()
    return ins, [int(d["index"]) for d in interp.get_output_details()]


def bare_invoke(interp: Interpreter, ins: list[int], outs: list[int], x: Call) -> list[np.ndarray]:
    """Set every input, invoke, read every output (one copy each, as the agent reads them)."""
    for i, v in zip(ins, as_tuple(x), strict=True):
        interp.set_tensor(i, v)
    interp.invoke()
    return [interp.get_tensor(o) for o in outs]


def bare_load_ms(path: Path, x: Call, *, c_api: bool = True, mapped: bool = False) -> float:
    """Read the file, build and allocate an interpreter, invoke once: the bare load.

    `mapped`: map the file instead of reading it, as the agent does.
    """
    t0 = time.perf_counter()
    if mapped:
        with path.open("rb") as f:
            data: bytes | mmap.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    else:
        data = path.read_bytes()
    interp = make_interpreter(data, c_api=c_api)
    bare_invoke(interp, *bare_ready(interp, x), x)
    return (time.perf_counter() - t0) * 1e3


def bare_invoke_latencies(data: bytes, x: Call, n: int) -> list[float]:
    interp = make_interpreter(data)
    ins, outs = bare_ready(interp, x)
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        bare_invoke(interp, ins, outs, x)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def max_gap_ms(stamps: list[list[float]], start: float, end: float) -> float:
    """The longest pause between consecutive completions (all threads) within [start, end]."""
    merged = sorted(s for per in stamps for s in per if start <= s <= end)
    return float(np.diff(merged).max() * 1e3) if len(merged) > 1 else 0.0


def max_gaps_during_ms(stamps: list[list[float]], spans: list[tuple[float, float]]) -> list[float]:
    """Per span: the longest pause between consecutive completions (all threads) that
    overlaps it (0.0 when none does)."""
    merged = np.array(sorted(s for per in stamps for s in per))
    if len(merged) < 2:
        return [0.0 for _ in spans]
    starts, ends = merged[:-1], merged[1:]
    out = []
    for a, b in spans:
        during = (ends >= a) & (starts <= b)
        out.append(float((ends - starts)[during].max() * 1e3) if during.any() else 0.0)
    return out


def run_load(call: Any, x: Call, threads: int, seconds: float) -> tuple[int, int, float]:
    """`threads` threads calling `call(x)` for `seconds`: (completed, failed, max gap ms).

    Each thread makes one call before the clock starts (the bare caller builds its
    interpreter on its first call), so both sides are timed warm.
    """
    stop = threading.Event()
    ready = threading.Barrier(threads + 1)
    stamps: list[list[float]] = [[] for _ in range(threads)]
    failed = [0] * threads

    def worker(i: int) -> None:
        mine = stamps[i]
        try:
            call(x)
        finally:
            ready.wait()
        while not stop.is_set():
            try:
                call(x)
                mine.append(time.perf_counter())
            except Exception:
                failed[i] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    ready.wait()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    merged = sorted(s for per in stamps for s in per)
    gap = float(np.diff(merged).max() * 1e3) if len(merged) > 1 else 0.0
    return len(merged), sum(failed), gap


def bare_caller(data: bytes, threads: int) -> Any:
    """One interpreter per calling thread, no lock: the fastest bare way to use `threads`."""
    local = threading.local()

    def call(x: Call) -> list[np.ndarray]:
        interp = getattr(local, "interp", None)
        if interp is None:
            interp = local.interp = make_interpreter(data)
            local.io = bare_ready(interp, x)
        return bare_invoke(interp, *local.io, x)

    return call


def deploy_command(data: bytes, version: str, key: Ed25519PrivateKey) -> DeployCommand:
    manifest = build_manifest(
        name="bench", version=version, data=data, signature=read_signature(data)
    )
    return DeployCommand(
        command_id=f"c-{uuid.uuid4().hex}",
        manifest=sign_manifest(manifest, key),
        url="http://127.0.0.1:9/never-fetched",  # both files are in the agent's store
        allow_downgrade=True,  # A<->B: every other swap goes back to the lower version
    )


def seed_store(agent: Agent, data: bytes, command: DeployCommand) -> None:
    manifest = command.manifest.unverified()
    dest = agent.store.download_path(manifest.sha256)
    dest.write_bytes(data)
    agent.store.adopt(command.manifest, manifest, dest)


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if args.model_a and args.model_b:
        a, b = args.model_a.read_bytes(), args.model_b.read_bytes()
    else:
        shape = {**HEAVY, "batch": args.batch}
        a, b = build_dense_model(seed=1, **shape), build_dense_model(seed=2, **shape)  # type: ignore[arg-type]
    padded = a == b
    if padded:  # the same model in another file: a deploy of the active file would not swap
        b = a + bytes(64)
    difference = read_signature(a).difference(read_signature(b))
    if difference is not None:
        raise SystemExit(f"error: B cannot replace A (the agent would refuse it): {difference}")
    probe = ModelSlot.load(ModelRef(name="probe", version="0", sha256="0" * 64), a)
    c_api = uses_c_api(probe.interpreter)
    xs = probe.sample_inputs(np.random.default_rng(0))
    # What an application passes: the array itself for a single-input, single-output model.
    x: Call = xs[0] if probe.single else xs

    files = [work / "a.tflite", work / "b.tflite"]
    files[0].write_bytes(a)
    files[1].write_bytes(b)
    n_loads = max(10, min(args.swaps, 40))

    # ---- baseline, bare interpreter: idle, and under the same inference load as the swaps
    loads_idle = [bare_load_ms(files[i % 2], x) for i in range(n_loads)]
    invoke_ms = bare_invoke_latencies(a, x, 300)
    bare = bare_caller(a, args.threads)
    stop_bare = threading.Event()

    bare_stamps: list[list[float]] = [[] for _ in range(args.threads)]

    def bare_worker(i: int) -> None:
        mine = bare_stamps[i]
        while not stop_bare.is_set():
            bare(x)
            mine.append(time.perf_counter())

    bare_threads = [threading.Thread(target=bare_worker, args=(i,)) for i in range(args.threads)]
    for t in bare_threads:
        t.start()
    await asyncio.sleep(0.1)
    loads_start = time.perf_counter()
    phase_loads = [bare_load_ms(files[i % 2], x) for i in range(n_loads)]
    loads_end = time.perf_counter()
    stop_bare.set()
    for t in bare_threads:
        t.join()
    loads_gap = max_gap_ms(bare_stamps, loads_start, loads_end)

    # ---- the agent
    key = Ed25519PrivateKey.generate()
    agent = Agent(
        AgentConfig(
            device_id="bench-1",
            region="bench",
            device_type="bench",
            data_dir=work / "agent",
            trusted_keys=(key.public_key(),),
            # Never connected: handle() is called directly.
            mqtt=parse_mqtt_url("mqtt://127.0.0.1:1"),
            interpreters=args.threads,
        )
    )
    await asyncio.to_thread(agent.restore)
    cmds = {"a": deploy_command(a, "1.0.0", key), "b": deploy_command(b, "2.0.0", key)}
    seed_store(agent, a, cmds["a"])
    seed_store(agent, b, cmds["b"])
    first = await agent.handle(cmds["a"])
    assert first is not None and first.phase == "activated", first

    # ---- steady-state throughput: bare vs agent, paired rounds (order alternating)
    bare_n = agent_n = 0
    bare_gap = agent_gap = 0.0
    round_ratios: list[float] = []
    for r in range(args.rounds):
        counts = {}
        for side in ("bare", "agent") if r % 2 == 0 else ("agent", "bare"):
            call = bare if side == "bare" else agent.infer
            n, _, gap = await asyncio.to_thread(run_load, call, x, args.threads, args.seconds)
            counts[side] = n
            if side == "bare":
                bare_n, bare_gap = bare_n + n, max(bare_gap, gap)
            else:
                agent_n, agent_gap = agent_n + n, max(agent_gap, gap)
        if counts["bare"]:
            round_ratios.append(counts["agent"] / counts["bare"])

    # ---- swaps under load
    stop = threading.Event()
    stamps: list[list[float]] = [[] for _ in range(args.threads)]
    failed = [0] * args.threads

    def worker(i: int) -> None:
        mine = stamps[i]
        while not stop.is_set():
            try:
                agent.infer(x)
                mine.append(time.perf_counter())
            except Exception:
                failed[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    await asyncio.sleep(0.2)
    swap_ms: list[float] = []
    confirm_ms: list[float] = []
    phases: dict[str, int] = {}
    spans: list[tuple[float, float]] = []
    # The denominator: a bare load of the same file right before each swap, under the same
    # inference threads, so that baseline and swaps see the machine at the same moments.
    # In turn with it, for reference: the same load from the file mapped (as the agent
    # reads it) and, when the C API is in use, the Python interpreter's load.
    kinds = ["read", "mapped", "binding"] if c_api else ["read", "mapped"]
    bare_loads: dict[str, list[float]] = {k: [] for k in kinds}
    bare_spans: list[tuple[float, float]] = []
    for i in range(args.swaps):
        target = "b" if i % 2 == 0 else "a"
        kind = kinds[i % len(kinds)] if args.swaps >= 2 * len(kinds) else "read"
        b0 = time.perf_counter()
        ms = await asyncio.to_thread(
            bare_load_ms,
            files[0 if target == "a" else 1],
            x,
            c_api=kind != "binding",
            mapped=kind == "mapped",
        )
        bare_spans.append((b0, time.perf_counter()))
        bare_loads[kind].append(ms)
        # The bare load and the swap each get the machine to themselves: a pause is
        # charged to the one that caused it.
        await asyncio.sleep(args.settle_ms / 1e3)
        if not args.resident:
            agent.runtime.restore(agent.runtime.active, None)  # force a load from the store
        cmd = cmds[target].model_copy(update={"command_id": f"c-{uuid.uuid4().hex}"})
        t0 = time.perf_counter()
        final = await agent.handle(cmd)
        t1 = time.perf_counter()
        spans.append((t0, t1))
        assert final is not None
        phases[final.phase] = phases.get(final.phase, 0) + 1
        if final.phase != "activated":
            print(f"bench: swap {i}: {final.phase} {final.reason}: {final.detail}", file=sys.stderr)
        swap_ms.append((agent.runtime.swapped_at - t0) * 1e3)
        confirm_ms.append((t1 - t0) * 1e3)
        await asyncio.sleep(args.settle_ms / 1e3)
        if args.progress and (i + 1) % 10 == 0:
            print(f"bench: {i + 1}/{args.swaps} swaps", file=sys.stderr, flush=True)
    await asyncio.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()

    inferences = sum(1 for per in stamps for s in per for a, b in spans if a <= s <= b)
    swap_gaps = max_gaps_during_ms(stamps, spans)
    gap = max(swap_gaps, default=0.0)
    # The same threads' longest pause while the bare interpreter loads the same files,
    # at the same moments of the run: what loading a model costs them with no agent.
    load_gap = max(max_gaps_during_ms(stamps, bare_spans), default=0.0)
    invoke_p99 = pct(invoke_ms, 99)
    swap_p50 = pct(swap_ms, 50)
    load_p50 = pct(bare_loads["read"], 50)
    mapped_p50 = pct(bare_loads["mapped"], 50)
    binding_p50 = pct(bare_loads.get("binding") or bare_loads["read"], 50)
    bare_rate = bare_n / (args.rounds * args.seconds)
    agent_rate = agent_n / (args.rounds * args.seconds)
    result = {
        "engine": ("litert-c-api" if c_api else tflite.RUNTIME_NAME),
        "swaps": args.swaps,
        "resident": args.resident,
        "threads": args.threads,
        "inferences": inferences,
        "dropped": sum(failed) + (args.swaps - phases.get("activated", 0)),
        "max_gap_ms": round(gap, 3),
        # The longest pause of a typical swap (median over the swaps of each one's longest).
        "swap_max_gap_ms_p50": round(pct(swap_gaps, 50), 3),
        "baseline_load_inline_max_gap_ms": round(load_gap, 3),
        "max_gap_to_baseline_load_gap_ratio": round(gap / load_gap, 3) if load_gap else None,
        "swap_ms_p50": round(swap_p50, 3),
        "swap_ms_p99": round(pct(swap_ms, 99), 3),
        "confirm_ms_p50": round(pct(confirm_ms, 50), 3),
        "baseline_load_ms_p50": round(load_p50, 3),
        "baseline_load_idle_ms_p50": round(pct(loads_idle, 50), 3),
        # Bare loads in a phase of their own, under the bare invoke loop's threads.
        "baseline_load_bare_threads_ms_p50": round(pct(phase_loads, 50), 3),
        "swap_to_baseline_ratio": round(swap_p50 / load_p50, 3) if load_p50 else None,
        # The same bare load from the file mapped, as the agent reads it (no copy).
        "baseline_load_mapped_ms_p50": round(mapped_p50, 3),
        "swap_to_mapped_baseline_ratio": round(swap_p50 / mapped_p50, 3) if mapped_p50 else None,
        # The Python interpreter (Interpreter + allocate_tensors + invoke) under the same load.
        "baseline_load_binding_ms_p50": round(binding_p50, 3),
        "swap_to_binding_baseline_ratio": round(swap_p50 / binding_p50, 3) if binding_p50 else None,
        # What the bare loads alone cost the bare inference threads: the floor for max_gap_ms.
        "baseline_load_max_gap_ms": round(loads_gap, 3),
        "infer_ms_p50": round(pct(invoke_ms, 50), 3),
        "infer_ms_p99": round(invoke_p99, 3),
        "max_gap_to_infer_p99_ratio": round(gap / invoke_p99, 3) if invoke_p99 else None,
        # The same measure with no swap at all, same threads: the machine's own noise.
        "bare_max_gap_ms": round(bare_gap, 3),
        "agent_no_swap_max_gap_ms": round(agent_gap, 3),
        "bare_inferences_per_s": round(bare_rate, 1),
        "agent_inferences_per_s": round(agent_rate, 1),
        # Median of the paired rounds' ratios; the pooled one and the spread beside it.
        "infer_throughput_ratio": round(float(np.median(round_ratios)), 3)
        if round_ratios
        else None,
        "infer_throughput_ratio_pooled": round(agent_rate / bare_rate, 3) if bare_rate else None,
        "infer_throughput_ratio_spread": [round(min(round_ratios), 3), round(max(round_ratios), 3)]
        if round_ratios
        else None,
        "model_bytes": len(a),
        "model_b_bytes": len(b),
        "model_b_padded": padded,
        "signature": probe.signature.describe(),
        "outcomes": phases,
    }
    result["targets"] = {
        "dropped == 0": result["dropped"] == 0,
        "swap_to_baseline_ratio <= 1.5": (result["swap_to_baseline_ratio"] or 99) <= 1.5,
        "infer_throughput_ratio >= 0.95": (result["infer_throughput_ratio"] or 0) >= 0.95,
        "max_gap_ms < 2 x infer p99": gap < 2 * invoke_p99,
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-a", type=Path, help=".tflite file A (default: generated)")
    p.add_argument("--model-b", type=Path, help=".tflite file B, same tensor signature")
    p.add_argument("--swaps", type=int, default=100)
    p.add_argument(
        "--batch", type=int, default=HEAVY["batch"], help="batch of the generated models "
        "(more compute per invoke, same weights: the load costs the same)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="concurrent inference threads")
    p.add_argument("--seconds", type=float, default=0.4, help="per side of a throughput round")
    p.add_argument("--rounds", type=int, default=16, help="paired bare/agent throughput rounds")
    p.add_argument("--resident", action="store_true", help="swap to the resident model")
    p.add_argument(
        "--settle-ms", type=float, default=30.0, help="pause between a bare load and a swap"
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--progress", action="store_true", help="progress on stderr")
    p.add_argument("--no-c-api", action="store_true", help="the Python interpreter only")
    args = p.parse_args(argv)
    if (args.model_a is None) != (args.model_b is None):
        p.error("give both --model-a and --model-b, or neither")
    for f in (args.model_a, args.model_b):
        if f is not None and not f.is_file():
            p.error(f"cannot read {f}")
    configure_logging("warning")
    if args.no_c_api:
        tflite.C_API = None
    with tempfile.TemporaryDirectory(prefix="hotswap-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    return result


if __name__ == "__main__":
    main()
