"""docs/configuration.md, rendered from the stage file's models in chalicelib/config.py.

The reference is generated so that it cannot drift from what ``fleetctl validate`` accepts: every key comes from
a model field, its type from the annotation, its default from the field, its constraints from the validators the
annotation carries, and its description from ``Field(description=...)``. A field with no description, or a
validator this module cannot put into words, stops the rendering with its name instead of leaving a gap.

``python -m fleetctl.config_reference`` writes the file; ``--check`` writes nothing and exits 1 when it is stale
(``tests/unit/test_config_reference.py`` does the same).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, Strict
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from chalicelib.config import FleetConfig

__all__ = ["REFERENCE_PATH", "ConfigReferenceError", "main", "render"]

REFERENCE_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGENERATE = "python -m fleetctl.config_reference"

_INTRO = f"""\
# Configuration reference

<!-- Generated from chalicelib/config.py by `{REGENERATE}`; edit the models' descriptions, not this file. -->

One file per stage, YAML or JSON (`chalicelib/stages/<stage>.yaml`), validated into frozen typed models by
`fleetctl validate` and by every function that reads it (all but the webhook) on its first event. Unknown keys
are errors, so a typo fails validation instead of being ignored.
[`chalicelib/stages/dev.yaml`](../chalicelib/stages/dev.yaml) is a complete example with every key. How a file
is checked against Chalice's stages and the live account, and how warm windows read their crons:
[stage-files.md](stage-files.md).

A path names a key as it sits in the file: `pools[].idle_wait_seconds` is the `idle_wait_seconds` of each item
of the `pools` list. Errors name the same key with the item's index and name: `pools[1](build).idle_wait_seconds`.
Keys whose default says *required* must be present; every other key may be left out.
"""


class ConfigReferenceError(Exception):
    """A model the reference cannot describe: a field without a description, or an unknown validator."""


@dataclass(frozen=True)
class _Shape:
    """What a field's annotation says: its type in words, its constraints, and the model it nests, if any."""

    kind: str
    constraints: tuple[str, ...] = ()
    model: type[BaseModel] | None = None
    item_of_list: bool = False


def render(root: type[BaseModel] = FleetConfig) -> str:
    """The whole reference of ``root`` (the stage file's model), as docs/configuration.md holds it."""
    sections = [_INTRO]
    for path, model in _models(root, ""):
        sections.append(_section(path, model))
    return "\n".join(sections)


def _models(model: type[BaseModel], path: str) -> Iterator[tuple[str, type[BaseModel]]]:
    """Each model of the file with its path, the top level first, nested ones in field order."""
    yield path, model
    for name, field in model.model_fields.items():
        shape = _shape(field.annotation, field.metadata, f"{model.__name__}.{name}")
        if shape.model is not None:
            child = f"{path}.{name}" if path else name
            yield from _models(shape.model, f"{child}[]" if shape.item_of_list else child)


def _section(path: str, model: type[BaseModel]) -> str:
    title = f"`{path}`" if path else "Top level"
    doc = inspect.cleandoc(model.__doc__ or "")
    lines = [
        f"## {title}",
        "",
        doc,
        "",
        "| key | type | default | constraints | description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in model.model_fields.items():
        where = f"{model.__name__}.{name}"
        if not field.description:
            raise ConfigReferenceError(f"{where} has no description: add Field(description=...) to the model")
        shape = _shape(field.annotation, field.metadata, where)
        key = f"{path}.{name}" if path else name
        cells = [f"`{key}`", shape.kind, _default(field), "; ".join(shape.constraints) or "-", field.description]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _shape(annotation: Any, metadata: list[Any], where: str) -> _Shape:
    """Reads an annotation (with pydantic's metadata already taken out of its outer ``Annotated``)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return _shape(base, [*extra, *metadata], where)
    constraints = tuple(text for item in metadata if (text := _constraint(item, where)))
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(options) != 1:
            raise ConfigReferenceError(f"{where}: only 'X | None' unions are described, got {annotation!r}")
        inner = _shape(options[0], [], where)
        return _Shape(f"{inner.kind} or null", inner.constraints + constraints, inner.model, inner.item_of_list)
    if origin is tuple:
        item = _shape(get_args(annotation)[0], [], where)
        each = tuple(f"each {text}" for text in item.constraints)
        kind = "list of mappings" if item.model is not None else f"list of {item.kind}s"
        return _Shape(kind, each + constraints, item.model, item_of_list=True)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return _Shape("one of " + ", ".join(f"`{member.value}`" for member in annotation), constraints)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _Shape("mapping", constraints, annotation)
    kinds = {bool: "boolean", int: "integer", str: "string"}
    if annotation in kinds:
        return _Shape(kinds[annotation], constraints)
    raise ConfigReferenceError(f"{where}: no words for the type {annotation!r}")


def _constraint(item: Any, where: str) -> str:
    """A validator's rule in words: the bounds or description a chalicelib.config check closes over, or the
    docstring of a named check. Strict() is the type itself (no coercion from strings), so it adds nothing."""
    if isinstance(item, Strict):
        return ""
    if not isinstance(item, AfterValidator):
        raise ConfigReferenceError(f"{where}: no words for the metadata {item!r}")
    check = item.func
    factory = getattr(check, "__qualname__", "").split(".<locals>.")[0]
    if factory != getattr(check, "__qualname__", ""):
        bound = inspect.getclosurevars(check).nonlocals
        if factory == "_between":
            return f"{bound['low']:,} to {bound['high']:,}"
        if factory == "_matching":
            return str(bound["description"])
        if factory == "_distinct":
            return f"no duplicate {bound['what']}" + ("; at least one" if bound["required"] else "")
    if check.__doc__:
        return inspect.cleandoc(check.__doc__)
    raise ConfigReferenceError(f"{where}: the validator {factory or check!r} has neither known bounds nor a docstring")


def _default(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "default_when_omitted" in extra:
        return str(extra["default_when_omitted"])
    if field.default is PydanticUndefined:
        return "*required*"
    return f"`{_literal(field.default)}`"


def _literal(value: Any) -> str:
    """A default as the user would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return "[]" if not value else "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, BaseModel):
        return "{}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description="Render docs/configuration.md from the models.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is stale")
    parser.add_argument("--path", type=Path, default=REFERENCE_PATH, help="the file (default: %(default)s)")
    args = parser.parse_args(argv)
    path: Path = args.path
    text = render()
    current = path.read_text(encoding="utf-8") if path.is_file() else None
    if current == text:
        print(f"{path} is current")
        return 0
    if args.check:
        print(f"{path} is stale: run '{REGENERATE}'", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
