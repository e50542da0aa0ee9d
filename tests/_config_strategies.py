"""Hypothesis strategies for ``bzconfig.json`` documents, derived from the attrs classes.

Nothing here lists a key by hand: every field of :class:`~bz.RunConfig` and of the tables
under it (and of each installed plugin's and metric's ``Config``) is generated from its
annotation, its default and what its validators declare. A key added to a config class
is generated the day it is added.

:func:`valid_documents` draws documents bz accepts; :func:`any_documents` mixes them with
near misses (a bound crossed by a little, a wrong type, an unknown key, a required key
left out, an unknown plugin or metric), so that a property can compare two judges of the
same documents.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

import attrs
from hypothesis import strategies as st

from bz._config_values import CLOCK_PATTERN
from bz._options import validator_schema
from bz.config import ConfigError, MetricSpec, PluginSpec, Seconds, structure

Strategy = st.SearchStrategy[Any]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
"""Any JSON value (finite numbers only: JSON has no NaN or infinity)."""

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


# -- what is installed --------------------------------------------------------------------


# Only bz's own plugins and metrics: what else happens to be installed (a package that
# fails to import, one with options of its own) must not change what the tests draw, nor
# stop them from being collected.


@functools.cache
def plugin_option_classes() -> dict[str, type | None]:
    """Built-in plugin name -> its ``Config`` class (None: no attrs options)."""
    from bz.plugins._inspection import config_class
    from bz.plugins._loader import discover, load_factory

    return {
        name: config_class(load_factory(source))
        for name, source in discover().sources.items()
        if source.builtin
    }


@functools.cache
def metric_option_classes() -> dict[str, type | None]:
    """Built-in metric name -> its ``Config`` class (None: takes no options)."""
    from bz._entry_points import BUILTIN_DISTRIBUTION
    from bz.metrics import available_metrics

    return {
        name: info.config
        for name, info in available_metrics().items()
        if info.distribution == BUILTIN_DISTRIBUTION
    }


# -- one value of an annotated type ---------------------------------------------------------


def _bounds(field: attrs.Attribute[Any] | None, annotation: Any) -> dict[str, Any]:
    return validator_schema(field.validator, annotation) if field is not None else {}


def _number(kind: type, checks: Mapping[str, Any], valid: bool) -> Strategy:
    low = checks.get("minimum")
    high = checks.get("maximum")
    inside: Strategy
    if kind is int:
        inside = st.integers(
            min_value=None if low is None else int(low),
            max_value=None if high is None else int(high),
        )
    else:
        inside = st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
    if valid:
        return inside
    # Just across each bound: where a schema and a validator most easily disagree.
    near = [bound + step for bound in (low, high) if bound is not None for step in (-1, 1)]
    edge = st.sampled_from(near) if near else st.nothing()
    if kind is float and low is not None:
        edge = edge | st.floats(min_value=low - 1, max_value=low, allow_nan=False)
    return inside | edge | st.integers() | st.floats(allow_nan=False, allow_infinity=False)


def _text(checks: Mapping[str, Any], valid: bool) -> Strategy:
    pattern = checks.get("pattern")
    allowed = checks.get("enum")
    if allowed is not None:
        inside: Strategy = st.sampled_from(allowed)
    elif pattern is not None:
        inside = st.from_regex(pattern)
    else:
        inside = st.text(
            min_size=checks.get("minLength", 0), max_size=min(checks.get("maxLength", 20), 20)
        )
    if valid:
        return inside
    return inside | st.text(max_size=12) | inside.map(lambda text: text + "x")


def _seconds(valid: bool) -> Strategy:
    inside = st.floats(min_value=0, allow_nan=False, allow_infinity=False) | st.from_regex(
        CLOCK_PATTERN
    )
    if valid:
        return inside
    return inside | st.floats(max_value=0, allow_nan=False) | st.text(max_size=10)


def value_of(
    annotation: Any, field: attrs.Attribute[Any] | None = None, *, valid: bool
) -> Strategy:
    """JSON for ``annotation``: what the converter reads into it (``valid``), or that and
    near misses of it."""
    checks = _bounds(field, annotation)
    wrong = st.nothing() if valid else json_values
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if annotation is Seconds:
        return _seconds(valid) | wrong
    if annotation is bool:
        return st.booleans() | wrong
    if annotation in (int, float):
        return _number(annotation, checks, valid) | wrong
    if annotation is str:
        return _text(checks, valid) | wrong
    if annotation is type(None):
        return st.none() | wrong
    if origin is Literal:
        inside = st.sampled_from(arguments)
        return inside if valid else inside | _text({}, valid=False) | wrong
    if origin is Union or origin is types.UnionType:
        # The field's validators apply to every member (bounds on `int | None`).
        return st.one_of([value_of(a, field, valid=valid) for a in arguments])
    if annotation == tuple[PluginSpec, ...]:
        return entries(plugin_option_classes(), valid=valid)
    if annotation == tuple[MetricSpec, ...]:
        return entries(metric_option_classes(), valid=valid)
    if origin is list or (origin is tuple and arguments[1:] == (Ellipsis,)):
        # Arrays of one item type (FSDP's shard_modules): each item near or wrong too.
        return st.lists(value_of(arguments[0], valid=valid), max_size=3) | wrong
    if origin is dict:
        return st.dictionaries(names, json_values, max_size=4) | wrong
    if isinstance(annotation, type) and attrs.has(annotation):
        return documents(annotation, valid=valid)
    return json_values


# -- objects --------------------------------------------------------------------------------


def _accepted(cls: type) -> Callable[[Any], bool]:
    def accepted(data: Any) -> bool:
        try:
            structure(data, cls)
        except ConfigError:
            return False
        return True

    return accepted


@functools.cache
def documents(cls: type, *, valid: bool) -> Strategy:
    """JSON objects for an attrs class, every field from its annotation and validators.

    With ``valid``: fields with a default are optional, required ones always given, and
    rules across fields (GradientClip's "exactly one") are met by filtering through the
    converter. Otherwise: such a document with one near miss (one value replaced by a
    near or wrong one, an unknown key added, a required key left out), or none at all,
    so that both judges see documents on either side of each rule.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: value_of(hints[f.name], f, valid=True) for f in attrs.fields(cls)}
    required = {n: s for n, s in fields.items() if _is_required(cls, n)}
    optional = {n: s for n, s in fields.items() if n not in required}
    accepted = st.fixed_dictionaries(required, optional=optional).filter(_accepted(cls))
    if valid:
        return accepted
    return st.builds(_with_one_miss(cls, hints), accepted, st.data()) | json_scalars


def _with_one_miss(cls: type, hints: Mapping[str, Any]) -> Callable[[Any, Any], Any]:
    def change(document: dict[str, Any], data: st.DataObject) -> Any:
        document = dict(document)
        names_of = [f.name for f in attrs.fields(cls)]
        # Mostly one value changed: every field has its own rules to get wrong.
        how = data.draw(st.sampled_from(["none", "value", "value", "value", "unknown", "missing"]))
        if how == "value":
            name = data.draw(st.sampled_from(names_of))
            field = getattr(attrs.fields(cls), name)
            document[name] = data.draw(value_of(hints[name], field, valid=False))
        elif how == "unknown":
            key = data.draw(names.filter(lambda n: n not in names_of))
            document[key] = data.draw(json_scalars)
        elif how == "missing" and document:
            document.pop(data.draw(st.sampled_from(sorted(document))))
        return document

    return change


def _is_required(cls: type, name: str) -> bool:
    return getattr(attrs.fields(cls), name).default is attrs.NOTHING


def _options(config: type | None, *, valid: bool, plugin: bool) -> Strategy:
    if config is not None:
        given = documents(config, valid=valid)
    elif valid:
        given = st.just({})
    else:
        given = st.just({}) | st.dictionaries(names, json_scalars, min_size=1, max_size=2)
    if not plugin:
        return given
    # Every plugin entry may say "enabled"; a disabled plugin's options are not read.
    switch_values: Strategy = st.booleans()
    switch = st.fixed_dictionaries({}, optional={"enabled": switch_values})
    if not valid:
        switch = switch | st.fixed_dictionaries({"enabled": json_scalars})
    return st.builds(
        lambda options, more: {**options, **more} if isinstance(options, dict) else options,
        given,
        switch,
    )


def entries(classes: Mapping[str, type | None], *, valid: bool) -> Strategy:
    """A ``plugins`` or ``metrics`` list: ``"name"``, ``{"name": null}`` or
    ``{"name": {options}}``, each name once, options from the name's ``Config``.

    Unless ``valid``, one entry may be a near miss (options of its own, an unknown
    name, not an entry at all), or the list not a list.
    """
    plugin = classes is plugin_option_classes()

    def entry(name: str, miss: bool) -> Strategy:
        options = _options(classes.get(name), valid=not miss, plugin=plugin)
        return st.just(name) | st.builds(lambda o: {name: o}, st.none() | options)

    def listed(chosen: list[str], miss_at: int) -> Strategy:
        return st.tuples(*[entry(n, i == miss_at) for i, n in enumerate(chosen)]).map(list)

    known = st.lists(st.sampled_from(sorted(classes)), unique=True, max_size=3)
    if valid:
        return known.flatmap(lambda chosen: listed(chosen, -1))
    odd = names | json_scalars | st.builds(lambda n, v: {n: v}, names, json_scalars)
    near = st.builds(
        lambda chosen, at, extra: listed(chosen, at).map(lambda got: got + extra),
        known,
        st.integers(0, 2),
        st.lists(odd, max_size=1),
    ).flatmap(lambda strategy: strategy)
    return near | json_values


def valid_documents() -> Strategy:
    """``bzconfig.json`` documents bz accepts, any key of ``RunConfig`` among them."""
    from bz.config import RunConfig

    return documents(RunConfig, valid=True)


def any_documents() -> Strategy:
    """``bzconfig.json`` documents, accepted or not: near misses of every key, and any
    JSON at all."""
    from bz.config import RunConfig

    return documents(RunConfig, valid=False) | json_values


def places() -> dict[str, tuple[type, Callable[[Any], Any]]]:
    """Every config class a document holds, and how to put one of its objects there:
    the tables under ``RunConfig`` (found from its annotations), each installed
    plugin's and metric's ``Config``."""
    from bz.config import RunConfig

    found: dict[str, tuple[type, Callable[[Any], Any]]] = {}

    def tables(cls: type, wrap: Callable[[Any], Any], path: str) -> None:
        hints = typing.get_type_hints(cls)
        for field in attrs.fields(cls):
            hint = hints[field.name]
            union = typing.get_origin(hint) in (Union, types.UnionType)
            for member in typing.get_args(hint) if union else (hint,):
                if isinstance(member, type) and attrs.has(member):
                    here = f"{path}{field.name}"
                    put = _under(wrap, field.name)
                    found[here] = (member, put)
                    tables(member, put, f"{here}.")

    tables(RunConfig, lambda value: value, "")
    for kind, classes in (
        ("plugins", plugin_option_classes()),
        ("metrics", metric_option_classes()),
    ):
        for name, config in classes.items():
            if config is not None:
                found[f"{kind}.{name}"] = (config, _entry(kind, name))
    return found


def _under(wrap: Callable[[Any], Any], key: str) -> Callable[[Any], Any]:
    return lambda value: wrap({key: value})


def _entry(kind: str, name: str) -> Callable[[Any], Any]:
    return lambda value: {kind: [{name: value}]}
