"""``bz config-schema`` and bz agree: the schema accepts exactly the documents bz accepts.

Documents are generated from the attrs classes (``RunConfig``, its tables, each
installed plugin's and metric's ``Config``: see ``tests/_config_strategies.py``), valid
ones and near misses alike. "bz accepts" is what ``bz check-config`` accepts: the
converter, then every metric built and every plugin's options read.

Rules of bz beyond what JSON Schema can state, kept out of the documents or out of
reach of the generator (docs/plugin-guide.md lists them for users):

- a plugin or metric is listed at most once (names are drawn without repeats);
- an ``integer`` is a JSON integer: JSON Schema also counts ``1.0``, bz wants ``1``, so
  the validator here is told bz's rule;
- rules comparing two fields (an ``optuna`` range's ``high >= low``, its 1e12 grid
  points), which random search spaces practically never reach.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jsonschema
import pytest
import structlog
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests._config_strategies import any_documents, documents, places, valid_documents
from tests._examples import examples

from bz._entry_points import Discovery
from bz.commands import cli
from bz.commands.schema import bzconfig_schema
from bz.config import ConfigError, RunConfig, structure
from bz.metrics import build_metrics
from bz.plugins._loader import discover, load_plugins


def _is_integer(_checker: jsonschema.TypeChecker, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


_BzValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = bzconfig_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return _BzValidator(schema)


@functools.cache
def _found() -> Discovery:
    # What is installed does not change during the test; reading it costs most of a call.
    return discover()


def schema_accepts(document: Any) -> bool:
    """Whether the JSON Schema of bzconfig.json finds no error in ``document``."""
    return _validator().is_valid(document)


def bz_accepts(document: Any) -> bool:
    """Whether ``bz check-config`` would pass ``document``: structure, metrics, plugins."""
    try:
        config = structure(document, RunConfig)
        build_metrics(config.metrics)
        with structlog.testing.capture_logs():  # refused options are faults, not events
            plugins = load_plugins(config.plugins, config, policy="isolate", discovery=_found())
    except ConfigError:
        return False
    return not plugins.faults


def _explain(document: Any) -> str:
    errors = [f"{e.json_path}: {e.message}" for e in _validator().iter_errors(document)]
    try:
        structure(document, RunConfig)
        converter = "structures"
    except ConfigError as exc:
        converter = str(exc)
    return f"document={document!r}\nschema: {errors}\nconverter: {converter}"


@given(any_documents())
@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_schema_accepts_exactly_what_bz_accepts(document: Any) -> None:
    assert schema_accepts(document) == bz_accepts(document), _explain(document)


@given(valid_documents())
@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_valid_documents_pass_both(document: dict[str, Any]) -> None:
    assert bz_accepts(document), _explain(document)
    assert schema_accepts(document), _explain(document)


@pytest.mark.parametrize("place", sorted(places()))
@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_each_table_and_each_plugins_options_agree(place: str, data: st.DataObject) -> None:
    # The whole-document property rarely reaches deep into one plugin's options: here
    # every config class gets near misses of its own, put where it sits in a document.
    cls, put = places()[place]
    document = put(data.draw(documents(cls, valid=False)))
    assert schema_accepts(document) == bz_accepts(document), _explain(document)


@pytest.mark.parametrize(
    "document",
    [
        # Found when FSDP's table arrived: the converter refused an empty class name,
        # the schema let it through (random search reaches it only rarely).
        {"distributed": {"fsdp": {"shard_modules": [""]}}},
        {"distributed": {"fsdp": {"shard_modules": "Block"}}},
        {"distributed": {"fsdp": {"shard_modules": [1]}}},
    ],
)
def test_disagreements_found_once_stay_fixed(document: dict[str, Any]) -> None:
    assert not bz_accepts(document), _explain(document)
    assert not schema_accepts(document), _explain(document)


_JSON_TYPE_WORD = re.compile(r'integer|number|string|boolean|null|object|array(\[.+\])?|".*"|any')


def test_listings_name_types_in_json_schemas_words() -> None:
    # list-plugins once said float/int/str where list-metrics said number/int/string.
    runner = CliRunner()
    plugins = json.loads(runner.invoke(cli, ["list-plugins", "--json"]).output)
    metrics = json.loads(runner.invoke(cli, ["list-metrics", "--json"]).output)
    listed = [o["type"] for entry in [*plugins, *metrics] for o in entry["options"] or ()]
    assert {"integer", "number", "boolean", "string | null"} <= set(listed)
    for listed_type in listed:
        for word in listed_type.split(" | "):
            assert _JSON_TYPE_WORD.fullmatch(word), listed_type
