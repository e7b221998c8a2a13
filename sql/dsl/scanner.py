"""A string- and comment-aware scanner for SQL scripts: statement boundaries, leading
keywords and the spans of ``occlusion(...)`` table-function calls.

Why a scanner rather than a full SQL grammar: the SQL around an explanation belongs to
DuckDB, whose dialect we neither can nor should re-implement. We only need to (1) split a
script at top-level ``;``, (2) see a statement's first words to route it, and (3) find our own
table function's call spans so the call (parsed by the lark grammar) can be replaced by the
name of the relation holding its result. All three only need tokens that respect quotes and
comments, which this module provides; everything else is passed through verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DslSyntaxError

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_NUMBER = re.compile(r"\d+(\.\d*)?([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?")


@dataclass(frozen=True)
class Token:
    kind: str  # word | number | string | quoted | punct
    text: str
    start: int
    end: int

    @property
    def upper(self) -> str:
        return self.text.upper() if self.kind == "word" else ""


def tokenize(text: str, start: int = 0, end: int | None = None) -> list[Token]:
    """Tokens of ``text[start:end]`` (positions absolute); comments and whitespace dropped."""
    end = len(text) if end is None else end
    out: list[Token] = []
    i = start
    while i < end:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif text.startswith("--", i):
            j = text.find("\n", i)
            i = end if j < 0 or j > end else j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0 or j + 2 > end:
                raise DslSyntaxError("unterminated /* comment", text, i)
            i = j + 2
        elif ch in "'\"":
            j = i + 1
            while True:
                j = text.find(ch, j)
                if j < 0 or j >= end:
                    what = "string literal" if ch == "'" else "quoted identifier"
                    raise DslSyntaxError(f"unterminated {what}", text, i)
                if j + 1 < end and text[j + 1] == ch:  # doubled quote = escaped quote
                    j += 2
                    continue
                break
            out.append(Token("string" if ch == "'" else "quoted", text[i : j + 1], i, j + 1))
            i = j + 1
        else:
            m = _WORD.match(text, i, end) or None
            if m:
                out.append(Token("word", m.group(), i, m.end()))
                i = m.end()
                continue
            m = _NUMBER.match(text, i, end)
            if m:
                out.append(Token("number", m.group(), i, m.end()))
                i = m.end()
                continue
            out.append(Token("punct", ch, i, i + 1))
            i += 1
    return out


@dataclass(frozen=True)
class Chunk:
    """One statement of a script: ``text[start:end]`` (without its ``;``) and its tokens."""

    start: int
    end: int
    tokens: tuple[Token, ...]

    def words(self, n: int) -> list[str]:
        """The first ``n`` tokens upper-cased (non-words as they are)."""
        return [t.upper or t.text for t in self.tokens[:n]]


def split(text: str) -> list[Chunk]:
    """Statements of a script, split at top-level ``;``; empty statements dropped."""
    toks = tokenize(text)
    chunks: list[Chunk] = []
    cur: list[Token] = []
    start = 0
    depth = 0
    for t in toks:
        if t.kind == "punct" and t.text in "([{":
            depth += 1
        elif t.kind == "punct" and t.text in ")]}":
            depth = max(0, depth - 1)
        if t.kind == "punct" and t.text == ";" and depth == 0:
            if cur:
                chunks.append(Chunk(cur[0].start, cur[-1].end, tuple(cur)))
            cur = []
            start = t.end
            continue
        cur.append(t)
    if cur:
        chunks.append(Chunk(cur[0].start, cur[-1].end, tuple(cur)))
    del start
    return chunks


def is_complete(text: str) -> bool:
    """True when ``text`` ends with a top-level ``;`` (used by the shell for multi-line input);
    an unterminated quote or comment means "not complete yet"."""
    try:
        toks = tokenize(text)
    except DslSyntaxError:
        return False
    depth = 0
    last = None
    for t in toks:
        if t.kind == "punct" and t.text in "([{":
            depth += 1
        elif t.kind == "punct" and t.text in ")]}":
            depth = max(0, depth - 1)
        last = t
    return last is not None and last.text == ";" and depth == 0


def find_calls(text: str, tokens: tuple[Token, ...] | list[Token],
               function: str = "occlusion") -> list[tuple[int, int]]:
    """Absolute (start, end) spans of ``function(...)`` calls among ``tokens``: the word (not
    quoted, not qualified by a preceding ``.``) followed by ``(``, up to its matching ``)``."""
    spans = []
    i = 0
    n = len(tokens)
    while i < n:
        t = tokens[i]
        if (t.kind == "word" and t.text.lower() == function and i + 1 < n
                and tokens[i + 1].text == "(" and tokens[i + 1].kind == "punct"
                and not (i > 0 and tokens[i - 1].text == ".")):
            depth = 0
            for j in range(i + 1, n):
                tj = tokens[j]
                if tj.kind == "punct" and tj.text in "([{":
                    depth += 1
                elif tj.kind == "punct" and tj.text in ")]}":
                    depth -= 1
                    if depth == 0:
                        spans.append((t.start, tj.end))
                        i = j
                        break
            else:
                raise DslSyntaxError(f"unclosed parenthesis in {function}(...) call", text,
                                     tokens[i + 1].start)
        i += 1
    return spans
