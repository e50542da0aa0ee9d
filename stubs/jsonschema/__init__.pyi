# Minimal stubs for the parts of jsonschema the tests use (jsonschema ships no types).
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

from jsonschema import validators as validators

class ValidationError(Exception):
    message: str
    json_path: str

class SchemaError(Exception):
    message: str

class TypeChecker:
    def redefine(self, type: str, fn: Callable[[TypeChecker, object], bool]) -> TypeChecker: ...

class Draft202012Validator:
    TYPE_CHECKER: ClassVar[TypeChecker]
    def __init__(self, schema: Mapping[str, Any]) -> None: ...
    @classmethod
    def check_schema(cls, schema: Mapping[str, Any]) -> None: ...
    def iter_errors(self, instance: object) -> Iterator[ValidationError]: ...
    def validate(self, instance: object) -> None: ...
    def is_valid(self, instance: object) -> bool: ...

def validate(instance: object, schema: Mapping[str, Any]) -> None: ...
