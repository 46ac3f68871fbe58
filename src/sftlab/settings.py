"""One shape for every verb's settings: a pydantic model whose fields hold the default and the
meaning, and the command-line options built from those fields.

    class EvalSettings(Settings):
        limit: int = Field(60, ge=0, description="suite prompts to run (0 = skip instruction following)")

    def eval_cmd(limit: int = option(EvalSettings, "limit", "--limit"), ...):
        settings = EvalSettings.from_options(locals())

The run config (`sftlab.config.RunConfig`) has the same shape; `sftlab config` lists its keys.
A value out of range raises the verb's own SftlabError naming the option and what it accepts.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from sftlab.errors import SftlabError


_MODEL_DEFAULT = object()


def option(model: type[BaseModel], name: str, *flags: str, default: Any = _MODEL_DEFAULT, **kwargs) -> Any:
    """A typer option whose default and help text are the settings field's. With `default=None`
    (an option that only overrides a value from a file) the help names the field's default."""
    import typer

    field = model.model_fields[name]
    own = ... if field.is_required() else field.get_default(call_default_factory=True)
    text = kwargs.pop("help", field.description)
    if default is _MODEL_DEFAULT:
        default = own
    elif own not in (None, [], {}, ...):
        text = f"{text} (default {own})"
    return typer.Option(default, *flags, help=text, **kwargs)


class Settings(BaseModel):
    """Base of a verb's settings: unknown keys are refused, bad values raise `error`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)
    error: ClassVar[type[SftlabError]] = SftlabError

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise self.error(_describe(exc)) from None

    @classmethod
    def from_options(cls, values: dict) -> Settings:
        """The settings among a command's parameters (e.g. its `locals()`)."""
        return cls(**{k: v for k, v in values.items() if k in cls.model_fields})


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        name = ".".join(str(x) for x in error["loc"]) or "settings"
        flag = "--" + name.replace("_", "-")
        parts.append(f"{flag} {error['input']}: {error['msg']}" if "input" in error else f"{flag}: {error['msg']}")
    return "; ".join(parts)
