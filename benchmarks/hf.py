"""A Hugging Face model under bz against the same model in a hand-written loop.

::

    .venv/bin/python benchmarks/hf.py            # about two minutes on 2 cores
    .venv/bin/python benchmarks/hf.py --quick    # a smoke run
    .venv/bin/python benchmarks/hf.py --json out.json --device cuda

The model is ``examples/hf_text_classification``'s: a ``BertForSequenceClassification``
built from a ``BertConfig`` (2 layers, hidden size 32, nothing downloaded), fed mapping
batches ``{"input_ids", "attention_mask", "labels"}`` made beforehand (a list, so no
loader cost hides the loop's), AdamW, one torch thread. The hand-written loop is the one
everyone writes for such a model::

    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()

bz trains the same batches with no ``loss_fn`` (its Hugging Face convention), no plugins
and no metrics. Rounds alternate between the two (the order flips each round) so that a
noisy neighbour slows both alike; a run of N steps costs ``fixed + N * step``, and runs
of one step give the fixed cost, so the ratio reported is per step with the fixed cost
(set-up, the first and last hooks) excluded, the median of the per-round ratios. Host
reads are counted in separate, untimed runs of N and 2N batches, for both variants: the
model reads some itself, so bz adds none when the two numbers are equal.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import BertConfig, BertForSequenceClassification

# Run as a script, Python puts benchmarks/ on the path; the shared clock is imported as
# ``benchmarks.clock``, so the repository's root goes there too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.clock import compare, per_step, timed

import bz
from bz.testing import count_host_reads

Run = Callable[[], None]
Batch = dict[str, torch.Tensor]

HAND = "hand loop: model(**batch).loss"
BZ = "bz, mapping batches, no loss_fn"
TARGET = 1.02


def model(device: torch.device) -> torch.nn.Module:
    """The example's model, with the same initial weights for every variant."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        id2label={0: "mostly high", 1: "mostly low"},
    )
    net: torch.nn.Module = BertForSequenceClassification(config)
    return net.to(device)


def data(count: int, device: torch.device, size: int = 32, length: int = 16) -> list[Batch]:
    """``count`` mapping batches of ``size`` sentences of ``length`` tokens."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        ids = torch.randint(2, 64, (size, length), generator=generator)
        batches.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": (ids[:, 1] < 32).long().to(device),
            }
        )
    return batches


def hand(batches: list[Batch], device: torch.device) -> Run:
    net = model(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def run() -> None:
        net.train()
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = net(**batch).loss
            loss.backward()
            optimizer.step()

    return run


def under_bz(batches: list[Batch], device: torch.device) -> Run:
    net = model(device)
    setup = bz.TrainingSetup(
        model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3), train_loader=batches
    )
    # seed=None: the model is already seeded; both variants start from the same weights.
    config = bz.RunConfig(epochs=1, device=str(device), seed=None, plugins=())

    def run() -> None:
        bz.Trainer().fit(setup, config)

    return run


VARIANTS: dict[str, Callable[[list[Batch], torch.device], Run]] = {HAND: hand, BZ: under_bz}


def measure(steps: int, repeats: int, device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Per variant: ``full`` (runs of ``steps``) and ``one`` (runs of one step) timings."""
    many, one = data(steps, device), data(1, device)
    times: dict[str, dict[str, list[float]]] = {n: {"full": [], "one": []} for n in VARIANTS}
    names = list(VARIANTS)
    for round_index in range(repeats + 1):  # the first round warms up
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            full = timed(VARIANTS[name](many, device), device)
            short = timed(VARIANTS[name](one, device), device)
            if round_index:
                times[name]["full"].append(full)
                times[name]["one"].append(short)
    return times


def reads_per_batch(
    prepare: Callable[[list[Batch], torch.device], Run], device: torch.device
) -> float:
    """Host reads per batch of a variant: a run of 2N batches against a run of N (the
    model itself reads some: compare bz's number with the hand loop's)."""
    size, totals = 8, []
    for count in (size, 2 * size):
        counter: Counter[str] = Counter()
        run = prepare(data(count, device), device)
        with count_host_reads(counter):
            run()
        totals.append(sum(counter.values()))
    return (totals[1] - totals[0]) / size


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print one Markdown row per variant."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="Fewer steps and rounds.")
    parser.add_argument("--steps", type=int, help="Optimizer steps per run (default 60).")
    parser.add_argument("--repeats", type=int, help="Timed rounds (default 9).")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N].")
    parser.add_argument("--json", dest="json_path", help="Also write the results here.")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    torch.set_num_threads(1)
    device = torch.device(args.device)
    steps = args.steps or (15 if args.quick else 60)
    repeats = args.repeats or (3 if args.quick else 9)
    times = measure(steps, repeats, device)

    mine = per_step(times[BZ]["full"], times[BZ]["one"], steps)
    theirs = per_step(times[HAND]["full"], times[HAND]["one"], steps)
    comparison = compare(mine, theirs)
    ratio, spread, overhead = comparison.ratio, comparison.spread, comparison.overhead

    def fastest(name: str) -> float:
        # Noise on a shared machine only ever adds time: the fastest runs are the least
        # disturbed ones.
        return (min(times[name]["full"]) - min(times[name]["one"])) / (steps - 1)

    fastest_ratio = fastest(BZ) / fastest(HAND)
    reads = {name: reads_per_batch(prepare, device) for name, prepare in VARIANTS.items()}
    print(f"# {BZ} vs {HAND}, {steps} steps, median of {repeats} rounds, {device}")
    print(
        "| variant | per step | vs hand loop | overhead per step | fastest runs: per step, "
        "vs hand loop | host reads per batch |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| {HAND} | {statistics.median(theirs) * 1e3:.2f} ms | — | — "
        f"| {fastest(HAND) * 1e3:.2f} ms | {reads[HAND]:g} |"
    )
    print(
        f"| {BZ} | {statistics.median(mine) * 1e3:.2f} ms | {ratio:.3f}× ± {spread:.3f} "
        f"| {overhead * 1e6:+.0f} µs | {fastest(BZ) * 1e3:.2f} ms, {fastest_ratio:.3f}× "
        f"| {reads[BZ]:g} |"
    )
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"target: at most {TARGET:.2f}× (median of the rounds' ratios): {verdict}")
    if args.json_path:
        result: dict[str, Any] = {
            "steps": steps,
            "repeats": repeats,
            "device": str(device),
            "torch": torch.__version__,
            "times": times,
            "ratio": ratio,
            "ratio_spread": spread,
            "fastest_ratio": fastest_ratio,
            "overhead_us_per_step": overhead * 1e6,
            "reads_per_batch": reads,
        }
        with open(args.json_path, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
