"""benchmarks/run.py --instructions: reading callgrind's dumps and the per-step difference.

The arithmetic runs on recorded dumps; one slow test runs the real thing (valgrind) on a
pure-Python workload whose second variant does exactly twice the work of the first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from benchmarks.loop import instructions, links
from benchmarks.loop.variants import BZ, BZ_ACCURACY, HAND, HAND_ACCURACY, KEYS, only, variants

# The head and the tail of a dump callgrind 3.19 wrote for --dump-before (the cost lines
# between them are left out: only the counts are read).
RECORDED = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 18641
cmd:  /usr/bin/python3.11 probe.py
part: 2

desc: Timerange: Basic block 30518330 - 30596604
desc: Trigger: --dump-before=closure_fcn

positions: line
events: Ir
summary: 398040


ob=(3) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(281) ./nptl/./nptl/pthread_mutex_lock.c
fn=(1560) pthread_mutex_lock@@GLIBC_2.2.5
80 18
+4 12

totals: 398040
"""


def test_a_dump_is_read_as_its_instruction_count() -> None:
    assert instructions.totals(RECORDED) == 398_040
    assert instructions.totals(RECORDED.replace("summary: 398040\n", "")) == 398_040


def test_a_file_that_is_not_a_dump_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a callgrind dump"):
        instructions.totals("events: Ir\n")


def test_dumps_are_the_main_threads_in_the_order_callgrind_numbered_them(
    tmp_path: Path,
) -> None:
    out = tmp_path / "callgrind.out"
    for number in (1, 2, 10, 11, 3):
        (tmp_path / f"callgrind.out.{number}-01").write_text("totals: 1\n")
        (tmp_path / f"callgrind.out.{number}-02").write_text("totals: 1\n")  # a thread
    out.write_text("totals: 1\n")  # the program's end: not a marked stretch
    (tmp_path / "callgrind.out-01").write_text("totals: 1\n")
    (tmp_path / "callgrind.out.old").write_text("totals: 1\n")
    assert [p.name.rpartition(".")[2] for p in instructions.dump_files(out)] == [
        "1-01",
        "2-01",
        "3-01",
        "10-01",
        "11-01",
    ]


def test_per_step_is_the_difference_of_the_2n_and_n_runs_over_n() -> None:
    # Per variant: before N (ignored), N steps, between (ignored), 2N steps. A fixed
    # cost of 5,000 in both runs drops out.
    counts = [999, 5_000 + 10 * 100, 77, 5_000 + 20 * 100]
    counts += [1, 7_000 + 10 * 300, 1, 7_000 + 20 * 300]
    assert instructions.per_step(counts, steps=10) == [100.0, 300.0]


def test_a_count_of_dumps_that_is_not_whole_variants_is_an_error() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        instructions.per_step([1, 2, 3, 4, 5], steps=10)


def test_ratios_compare_each_variant_with_its_baseline() -> None:
    counts = {HAND: 1_000.0, BZ: 1_024.0, HAND_ACCURACY: 1_100.0, BZ_ACCURACY: 1_133.0}
    baselines = {HAND: HAND, BZ: HAND, HAND_ACCURACY: HAND, BZ_ACCURACY: HAND_ACCURACY}
    ratios = instructions.ratios(counts, baselines)
    assert ratios[BZ] == pytest.approx(1.024)
    assert ratios[BZ_ACCURACY] == pytest.approx(1.03)
    table = instructions.markdown("tiny", 64, counts, baselines, HAND)
    assert "N = 64" in table
    assert f"| {BZ_ACCURACY} | {HAND_ACCURACY} | 0.001 M | 1.030× | 1.133× |" in table


def test_the_last_line_names_every_ratio_and_says_what_was_not_counted() -> None:
    names = {"bare": "b", "accuracy": "a", "defaults": "d", "noop": "n", "hand": "h"}
    baselines = {"b": "h", "a": "ha", "d": "h", "n": "h", "h": "h", "ha": "h"}
    counts = {"h": 1000.0, "b": 1010.0, "ha": 1100.0, "a": 1111.0, "n": 1040.0}
    assert instructions.last_line(counts, baselines, names, plugins=10) == (
        "instructions: bare 1.010x, accuracy 1.010x, defaults n/a, per no-op plugin 0.30%"
    )


def test_a_count_from_several_processes_is_their_median_and_range() -> None:
    counted = instructions.summarise("bz", [1_010.0, 1_000.0, 1_030.0])
    assert (counted.per_step, counted.low, counted.high) == (1_010.0, 1_000.0, 1_030.0)
    assert counted.spread == pytest.approx(15 / 1_010)
    assert instructions.summarise("one", [7.0]).spread == 0.0
    with pytest.raises(ValueError, match="no counts for bz"):
        instructions.summarise("bz", [])


def test_the_spread_of_a_ratio_adds_both_counts_spreads() -> None:
    counts = {HAND: 1_000.0, BZ: 1_030.0}
    baselines = {HAND: HAND, BZ: HAND}
    spreads = {HAND: 0.002, BZ: 0.003}
    assert instructions.ratio_spread(spreads, baselines, BZ) == pytest.approx(0.005)
    assert instructions.ratio_spread(spreads, baselines, HAND) == 0.0
    assert instructions.ratio_spread({BZ: 0.003}, baselines, BZ) is None
    table = instructions.markdown("tiny", 64, counts, baselines, HAND, spreads, layouts=3)
    assert "median of 3 fresh processes per row" in table
    assert f"| {BZ} | {HAND} | 0.001 M ± 0.30% | 1.030× ± 0.005 | 1.030× |" in table
    names = {"bare": BZ, "accuracy": "a", "defaults": "d", "noop": "n", "hand": HAND}
    assert instructions.spread_line(spreads, baselines, names, 3) == (
        "instructions, moved by the heap's layout (3 processes per row): "
        "bare ±0.50%, accuracy n/a, defaults n/a"
    )


def test_a_moved_layout_keeps_more_for_a_larger_amount() -> None:
    assert instructions.shift_layout(0) == []
    one, two = instructions.shift_layout(1), instructions.shift_layout(2)
    assert len(two) > len(one) > 0
    assert sum(len(k) for k in two if isinstance(k, bytes | bytearray)) > sum(
        len(k) for k in one if isinstance(k, bytes | bytearray)
    )


PROBE = textwrap.dedent(
    """
    import json, os, sys
    import benchmarks.loop.instructions as counted
    print(json.dumps({
        "path": sys.path, "env": dict(os.environ), "cwd": os.getcwd(),
        "files": [counted.__file__], "prefix": sys.prefix, "executable": sys.executable,
    }))
    """
)


def test_the_counted_process_sees_no_path_of_the_checkout(tmp_path: Path) -> None:
    # Where the checkout lies must not reach the child: those strings' lengths move the
    # heap's layout, and with it the counts.
    real = Path(instructions.__file__).resolve().parents[2]
    python, env, cwd = links.isolated(tmp_path, "/usr/bin/valgrind")
    done = subprocess.run(
        [python, "-S", "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True, check=True
    )
    seen = json.loads(done.stdout)
    strings = [*seen["path"], *seen["env"].values(), seen["cwd"], *seen["files"], seen["prefix"]]
    strings.append(seen["executable"])
    assert not [s for s in strings if str(real) in s]
    assert not [s for s in strings if sys.prefix in s and sys.prefix != sys.base_prefix]
    assert Path(seen["files"][0]).resolve() == Path(instructions.__file__).resolve()
    assert seen["env"]["PYTHONHASHSEED"] == "0"
    assert set(seen["env"]) <= {*links.KEPT_ENVIRONMENT, *_FIXED}


_FIXED = {"PATH", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONPYCACHEPREFIX"}
_FIXED |= {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "LC_CTYPE"}


def test_only_keeps_the_named_variants_and_their_hand_written_baselines() -> None:
    chosen = only(variants(with_lightning=False, with_bf16=True), ["accuracy"])
    assert [variant.name for variant in chosen] == [HAND_ACCURACY, BZ_ACCURACY]
    every = variants(with_lightning=False, with_bf16=True)
    assert only(every, []) == every
    assert set(KEYS.values()) >= {variant.name for variant in every}


CHILD = textwrap.dedent(
    """
    from benchmarks.loop.instructions import measured

    def work(units):
        def make(steps):
            def run():
                total = 0
                for _ in range(steps):
                    for i in range(units * 50):
                        total += i
            return run
        return make

    measured(work(1), 200)
    measured(work(2), 200)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_callgrind_counts_twice_the_work_as_twice_the_instructions() -> None:
    counts = instructions.callgrind(["-c", CHILD], dumps=2 * instructions.MARKS_PER_VARIANT)
    once, twice = instructions.per_step(counts, steps=200)
    assert once > 50 * 10  # at least a few instructions per loop turn
    assert twice / once == pytest.approx(2.0, rel=0.05)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_a_process_that_never_marks_is_an_error_not_a_number() -> None:
    with pytest.raises(RuntimeError, match="expected 4 callgrind dumps, got 0"):
        instructions.callgrind(["-c", "pass"], dumps=4)


def test_the_links_folder_is_the_same_each_time_and_as_long_from_any_checkout() -> None:
    folder = links.links_folder()
    assert folder == links.links_folder()
    assert folder.name.startswith("bz-callgrind-")
    assert len(folder.name) == len("bz-callgrind-") + 12


def test_layouts_and_jobs_are_options_of_the_instruction_counts() -> None:
    from benchmarks.loop.cli import parse

    plain = parse(["--instructions"])
    assert plain.layouts == 1
    assert plain.jobs >= 1
    chosen = parse(["--instructions", "--layouts", "3", "--jobs", "1", "--only", "bare"])
    assert (chosen.layouts, chosen.jobs, chosen.only) == (3, 1, ["bare"])


@pytest.mark.parametrize("option", ["--layouts", "--jobs"])
def test_fewer_than_one_process_is_a_usage_error(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.loop.cli import parse

    with pytest.raises(SystemExit) as exit_info:
        parse(["--instructions", option, "0"])
    assert exit_info.value.code == 2
    assert f"{option} must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_a_process_counted_again_counts_the_same_to_the_instruction() -> None:
    # The runs between the marks, not the busy waits for callgrind_control around them.
    dumps = 2 * instructions.MARKS_PER_VARIANT
    first = instructions.per_step(instructions.callgrind(["-c", CHILD], dumps), steps=200)
    again = instructions.per_step(instructions.callgrind(["-c", CHILD], dumps), steps=200)
    assert again == first


def test_the_rounds_benchmark_counts_every_per_batch_training_hook() -> None:
    # benchmarks/rounds.py stands for a training step's plugin rounds: its hooks must be
    # the table's per-batch training hooks, each a no-op its plugin really implements.
    from benchmarks import rounds

    from bz.plugins._hooks import HOOKS

    per_batch = {spec.name for spec in HOOKS if spec.per_batch and spec.phase == "train"}
    assert set(rounds.HOOKS) == per_batch
    from benchmarks.loop.variants import NoOpPlugin

    plugin = NoOpPlugin(0)  # what rounds.py's plugins are
    assert all(callable(getattr(plugin, hook)) for hook in rounds.HOOKS)
