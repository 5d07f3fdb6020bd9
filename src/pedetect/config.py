"""A small, generic YAML → pydantic loader shared by the stages.

``load_config(path, Model)`` reads one YAML mapping and validates it against ``Model``. Models are
expected to forbid unknown keys (``model_config = ConfigDict(extra="forbid")``, see
:class:`StrictModel`): an unknown or misspelt key is a :class:`ConfigError` naming the key, the file
and the keys that are allowed there. An empty file gives the model's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message says what and where."""


class StrictModel(BaseModel):
    """Base of config models: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The (sub)model that holds the field at ``loc`` (list indices and dict keys skipped)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # a list index or a dict key: stay on the element type found below
        current = inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def inner_model(annotation: Any) -> Any:
    """The pydantic model inside ``Optional[M]``, ``list[M]``, ``dict[str, M]``, … (or the annotation)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = inner_model(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the (sub)model at ``loc``, sorted; empty where ``loc`` leads to no model."""
    owner = model_at(model, loc)
    return sorted(owner.model_fields) if owner is not None else []


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """One readable line per problem: where (dotted key), what, and for unknown keys the allowed ones."""
    lines = []
    for problem in error.errors():
        loc = tuple(problem.get("loc", ()))
        where = ".".join(str(part) for part in loc) or "(top level)"
        if problem.get("type") == "extra_forbidden":
            allowed = ", ".join(allowed_keys(model, loc[:-1])) or "?"
            lines.append(f"{source}: unknown key {where!r}; allowed keys here: {allowed}")
        else:
            lines.append(f"{source}: {where}: {problem.get('msg')} (got {problem.get('input')!r})")
    return "\n".join(lines)


def validate_config(data: Any, model: type[M], *, source: str = "config") -> M:
    """Validate an already-parsed mapping; errors as :class:`ConfigError` naming ``source``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, model, source)) from None


def read_yaml(path: str | Path) -> Any:
    """The YAML file at ``path``, parsed safely (plain data only); errors as :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def load_config(path: str | Path, model: type[M]) -> M:
    """Read the YAML file at ``path`` and validate it as ``model``."""
    return validate_config(read_yaml(path), model, source=str(path))
