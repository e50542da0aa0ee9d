"""Attribute docstrings: the string literal written under a field of a config class.

``bz list-plugins --verbose``, ``bz list-metrics --verbose`` and ``bz config-schema``
show them, so a config class documents its options once, where they are declared.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap


def attribute_docs(cls: type) -> dict[str, str]:
    """Docstrings written under annotated class attributes (as Sphinx reads them).

    Best effort: a class whose source is unavailable (built in a REPL, or shipped
    without sources) simply has no option docs.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    if not tree.body or not isinstance(tree.body[0], ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(tree.body[0].body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs
