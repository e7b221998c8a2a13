"""The AST of the explanation language: plain dataclasses, positions are absolute offsets
into the script text (for error carets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Word(str):
    """A bare word used as a value (``ALL``, ``exact``, ``bbox``): compared case-insensitively
    by the binder, kept distinct from a quoted string."""

    def __repr__(self) -> str:
        return f"Word({str(self)!r})"


@dataclass(frozen=True)
class Arg:
    name: str | None  # None for a positional argument
    value: Any  # int | float | str | Word | tuple | dict | bool | None
    pos: int  # offset of the argument (name, or value when positional)
    value_pos: int = -1


@dataclass
class Statement:
    start: int  # span of the statement in the script (without its ';')
    end: int


@dataclass
class CreateModel(Statement):
    name: str = ""
    kind: str = "file"  # file | zoo | package
    source: str = ""
    options: list[Arg] = field(default_factory=list)
    replace: bool = False
    name_pos: int = 0
    source_pos: int = 0


@dataclass
class CreateImage(Statement):
    name: str = ""
    kind: str = "file"  # file | sample
    source: str = ""
    replace: bool = False
    name_pos: int = 0
    source_pos: int = 0


@dataclass
class CreateImages(Statement):
    pattern: str = ""
    replace: bool = False
    source_pos: int = 0


@dataclass
class SetOption(Statement):
    name: str = ""
    value: Any = None
    name_pos: int = 0
    value_pos: int = 0


@dataclass
class ResetOption(Statement):
    name: str = ""  # "all" resets everything
    name_pos: int = 0


@dataclass
class Show(Statement):
    what: str = ""
    what_pos: int = 0


@dataclass
class Calibrate(Statement):
    model: str | None = None
    image: str | None = None
    model_pos: int = 0
    image_pos: int = 0


@dataclass
class Tune(Statement):
    model: str = ""
    images: list[str] = field(default_factory=list)
    options: list[Arg] = field(default_factory=list)
    model_pos: int = 0


@dataclass
class OcclusionCall:
    start: int
    end: int
    args: list[Arg] = field(default_factory=list)


@dataclass
class SqlStatement(Statement):
    """Any other statement: DuckDB's SQL, with our ``occlusion(...)`` calls located."""

    calls: list[OcclusionCall] = field(default_factory=list)
    bare_call: bool = False  # the statement is just ``occlusion(...)``: SELECT * from it


@dataclass
class Explain(Statement):
    inner: SqlStatement | None = None
    verbose: bool = False
    analyze: bool = False
    ablation: bool = False
    format: str = "text"  # text | json
