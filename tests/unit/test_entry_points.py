"""The one rule for a name two distributions register (plugins and metrics alike)."""

from __future__ import annotations

from random import Random

from hypothesis import given
from hypothesis import strategies as st

from bz._entry_points import BUILTIN_DISTRIBUTION, EntrySource, choose, duplicate_message

THIRD_PARTY = st.text("abcdefgh-", min_size=1, max_size=6).filter(
    lambda name: name != BUILTIN_DISTRIBUTION
)


@st.composite
def registrations(draw: st.DrawFn) -> list[EntrySource]:
    """Entries of one group: a few names, each registered by one or more distributions."""
    entries: list[EntrySource] = []
    for name in draw(st.lists(st.sampled_from("xyz"), min_size=1, max_size=3, unique=True)):
        distributions = draw(st.lists(THIRD_PARTY, min_size=1, max_size=4, unique=True))
        if draw(st.booleans()):
            distributions.append(BUILTIN_DISTRIBUTION)
        entries.extend(
            EntrySource(name, f"{dist.replace('-', '_')}:{name}", dist, "1.0")
            for dist in distributions
        )
    return draw(st.permutations(entries))


@given(registrations(), st.randoms())
def test_the_chosen_source_does_not_depend_on_the_order_packages_are_found(
    entries: list[EntrySource], rng: Random
) -> None:
    shuffled = list(entries)
    rng.shuffle(shuffled)
    assert choose(entries).sources == choose(shuffled).sources


@given(registrations())
def test_bz_wins_then_the_first_distribution_in_alphabetical_order(
    entries: list[EntrySource],
) -> None:
    discovery = choose(entries)
    for name, chosen in discovery.sources.items():
        candidates = [e for e in entries if e.name == name]
        names = {e.distribution or "" for e in candidates}
        expected = BUILTIN_DISTRIBUTION if BUILTIN_DISTRIBUTION in names else min(names)
        assert chosen.distribution == expected
        losers = discovery.duplicates.get(name, ())
        assert sorted(e.value for e in (chosen, *losers)) == sorted(e.value for e in candidates)


@given(registrations())
def test_the_same_distribution_seen_twice_is_not_a_clash(entries: list[EntrySource]) -> None:
    assert choose([*entries, *entries]) == choose(entries)


def test_the_message_says_which_is_used_and_why() -> None:
    ours = EntrySource("accuracy", "bz.metrics:Accuracy", BUILTIN_DISTRIBUTION, "0.1.0")
    theirs = EntrySource("accuracy", "other:Accuracy", "other-metrics", "2.0")
    assert duplicate_message("metric", "accuracy", ours, [theirs]) == (
        "metric name 'accuracy' is provided by bz-cli (bz.metrics:Accuracy) and by "
        "other-metrics (other:Accuracy); using bz-cli: bz's own metrics take precedence"
    )
