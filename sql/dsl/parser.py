"""Text -> AST: ``parse(script)`` returns one AST statement per ``;``-separated statement.

Routing (by the statement's first words, see ``scanner.py``): our statements (CREATE
MODEL/IMAGE/IMAGES, SET/RESET of our options, SHOW OPTIONS/MODELS/IMAGES/RUNS/DATASETS/RULES/CACHE,
CALIBRATE, TUNE) are parsed by the lark grammar (``grammar.py``); ``EXPLAIN`` takes our flags
and the statement behind them; everything else is DuckDB's SQL, in which each
``occlusion(...)`` call is parsed by the grammar's ``call`` rule. SET/RESET of an option that
is not ours goes to DuckDB (``SET threads = 4`` keeps working).
"""

from __future__ import annotations

import functools

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast as dsl_ast
from .errors import DslSyntaxError
from .grammar import GRAMMAR
from .scanner import Chunk, find_calls, split

SHOW_WHAT = ("OPTIONS", "MODELS", "IMAGES", "RUNS", "DATASETS", "RULES", "CACHE")
_CREATE_WHAT = ("MODEL", "IMAGE", "IMAGES")


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(GRAMMAR, start=["statement", "call"], parser="lalr", maybe_placeholders=False)


def _unquote(tok: str) -> str:
    return tok[1:-1].replace("''", "'")


class _ToAst(Transformer):
    """Parse tree -> AST values; statements come back as (kind, fields) and are finished by
    ``_finish`` which knows the statement span."""

    # -- values ------------------------------------------------------------------------------
    def int(self, items):
        return int(items[0]), items[0].start_pos

    def float(self, items):
        return float(items[0]), items[0].start_pos

    def string(self, items):
        return _unquote(items[0]), items[0].start_pos

    def word(self, items):
        w = str(items[0])
        low = w.lower()
        val = {"true": True, "false": False, "null": None}.get(low, dsl_ast.Word(w)) \
            if low in ("true", "false", "null") else dsl_ast.Word(w)
        return val, items[0].start_pos

    def tuple(self, items):
        pos = items[0][1] if items else -1
        return tuple(v for v, _ in items), pos

    def struct(self, items):
        pos = items[0][2] if items else -1
        return {k: v for k, v, _ in items}, pos

    def field(self, items):
        key, (val, _) = items
        k = _unquote(key) if key.type == "STRING" else str(key).lower()
        return k, val, key.start_pos

    def name(self, items):
        t = items[0]
        return (_unquote(t) if t.type == "STRING" else str(t)), t.start_pos

    # -- arguments -----------------------------------------------------------------------------
    def named(self, items):
        key, (val, vpos) = items
        return dsl_ast.Arg(str(key).lower(), val, key.start_pos, vpos)

    def positional(self, items):
        (val, vpos), = items
        return dsl_ast.Arg(None, val, vpos, vpos)

    def with_clause(self, items):
        return ("with", [a for a in items if isinstance(a, dsl_ast.Arg)])

    def call(self, items):
        return [a for a in items if isinstance(a, dsl_ast.Arg)]

    # -- statements ------------------------------------------------------------------------------
    def replace(self, items):
        return ("replace", bool(items))

    def src_file(self, items):
        return ("file", _unquote(items[0]), items[0].start_pos)

    def src_zoo(self, items):
        return ("zoo", _unquote(items[0]), items[0].start_pos)

    def src_package(self, items):
        return ("package", _unquote(items[0]), items[0].start_pos)

    def src_sample(self, items):
        return ("sample", _unquote(items[0]), items[0].start_pos)

    def create_model(self, items):
        (_, rep), (name, npos), (kind, src, spos), *rest = items
        opts = rest[0][1] if rest else []
        return dsl_ast.CreateModel(0, 0, name=name, kind=kind, source=src, options=opts, replace=rep,
                             name_pos=npos, source_pos=spos)

    def create_image(self, items):
        (_, rep), (name, npos), (kind, src, spos) = items
        return dsl_ast.CreateImage(0, 0, name=name, kind=kind, source=src, replace=rep, name_pos=npos,
                             source_pos=spos)

    def create_images(self, items):
        (_, rep), tok = items
        return dsl_ast.CreateImages(0, 0, pattern=_unquote(tok), replace=rep, source_pos=tok.start_pos)

    def set_stmt(self, items):
        key, (val, vpos) = [i for i in items if not (isinstance(i, Token) and i.type != "NAME")]
        return dsl_ast.SetOption(0, 0, name=str(key).lower(), value=val, name_pos=key.start_pos,
                           value_pos=vpos)

    def reset_stmt(self, items):
        key = items[0]
        return dsl_ast.ResetOption(0, 0, name=str(key).lower(), name_pos=key.start_pos)

    def show_stmt(self, items):
        key = items[0]
        return dsl_ast.Show(0, 0, what=str(key).upper(), what_pos=key.start_pos)

    def calibrate_stmt(self, items):
        if not items:
            return dsl_ast.Calibrate(0, 0)
        (m, mpos), (i, ipos) = items
        return dsl_ast.Calibrate(0, 0, model=m, image=i, model_pos=mpos, image_pos=ipos)

    def tune_stmt(self, items):
        (m, mpos), *rest = items
        opts = []
        if rest and isinstance(rest[-1], tuple) and rest[-1][0] == "with":
            opts = rest.pop()[1]
        return dsl_ast.Tune(0, 0, model=m, images=[n for n, _ in rest], options=opts, model_pos=mpos)

    @v_args(inline=True)
    def statement(self, stmt):
        return stmt


_PRETTY = {"LPAR": "'('", "RPAR": "')'", "COMMA": "','", "EQUAL": "'='", "LSQB": "'['",
           "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'", "COLON": "':'", "NAME": "a name",
           "STRING": "a 'string'", "SIGNED_INT": "a number", "SIGNED_FLOAT": "a number",
           "$END": "end of statement"}


def _expected(names) -> str:
    lark = _lark()
    shown = set()
    for n in names:
        if n in _PRETTY:
            shown.add(_PRETTY[n])
            continue
        try:
            pat = lark.get_terminal(n).pattern
            shown.add(pat.value.upper() if pat.type == "str" else n)
        except KeyError:
            shown.add(n)
    return ", ".join(sorted(shown))


def _parse_rule(text: str, start: int, end: int, rule: str):
    """Parse ``text[start:end]`` with ``rule``; token positions stay absolute (the prefix is
    blanked, not cut, so every offset indexes ``text``)."""
    src = " " * start + text[start:end]
    try:
        tree = _lark().parse(src, start=rule)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, end) from None
    return _ToAst().transform(tree)


def _syntax_error(exc: UnexpectedInput, text: str, end: int) -> DslSyntaxError:
    if isinstance(exc, UnexpectedToken):
        tok = exc.token
        pos = tok.start_pos if tok.type != "$END" else end
        got = "end of statement" if tok.type == "$END" else repr(str(tok))
        return DslSyntaxError(f"syntax error: unexpected {got}; expected {_expected(exc.expected)}",
                              text, pos)
    if isinstance(exc, UnexpectedCharacters):
        ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        return DslSyntaxError(f"syntax error: unexpected character {ch!r}", text, exc.pos_in_stream)
    if isinstance(exc, UnexpectedEOF):
        return DslSyntaxError(f"syntax error: unexpected end of statement; expected "
                              f"{_expected(exc.expected)}", text, end)
    return DslSyntaxError(f"syntax error: {exc}", text, getattr(exc, "pos_in_stream", end))


def parse_call(text: str, start: int, end: int) -> dsl_ast.OcclusionCall:
    """One ``occlusion(...)`` call spanning ``text[start:end]``."""
    return dsl_ast.OcclusionCall(start, end, _parse_rule(text, start, end, "call"))


def _sql(text: str, chunk: Chunk, tokens) -> dsl_ast.SqlStatement:
    spans = find_calls(text, tokens)
    calls = [parse_call(text, s, e) for s, e in spans]
    first = tokens[0].start if tokens else chunk.start
    bare = len(spans) == 1 and spans[0] == (first, chunk.end)
    return dsl_ast.SqlStatement(first, chunk.end, calls=calls, bare_call=bare)


def is_ours(chunk: Chunk, options) -> bool:
    """Is this statement one of ours (parsed by the grammar) rather than DuckDB's SQL?"""
    w = chunk.words(4)
    head = w[0] if w else ""
    if head == "CREATE":
        return (len(w) > 1 and w[1] in _CREATE_WHAT) or (
            w[1:3] == ["OR", "REPLACE"] and len(w) > 3 and w[3] in _CREATE_WHAT)
    if head in ("SET", "RESET"):
        return len(w) > 1 and (w[1].lower() in options or (head == "RESET" and w[1] == "ALL"))
    if head == "SHOW":
        return len(w) > 1 and w[1] in SHOW_WHAT
    return head in ("CALIBRATE", "TUNE")


def parse_statement(text: str, chunk: Chunk, options=frozenset()) -> dsl_ast.Statement:
    """One statement (a ``Chunk`` of ``text``) -> AST."""
    toks = chunk.tokens
    if toks and toks[0].upper == "EXPLAIN":
        i, flags = 1, dict(verbose=False, analyze=False, ablation=False, format="text")
        while i < len(toks) and toks[i].upper in ("VERBOSE", "ANALYZE", "ABLATION", "FORMAT"):
            kw = toks[i].upper
            if kw == "FORMAT":
                if i + 1 >= len(toks) or toks[i + 1].upper not in ("TEXT", "JSON", "SQL"):
                    at = toks[i + 1].start if i + 1 < len(toks) else chunk.end
                    raise DslSyntaxError("syntax error: FORMAT takes TEXT, JSON or SQL", text, at)
                flags["format"] = toks[i + 1].upper.lower()
                i += 2
                continue
            flags[kw.lower()] = True
            i += 1
        if flags["ablation"]:
            flags["analyze"] = True
        if flags["format"] == "sql" and (flags["analyze"] or flags["verbose"]):
            raise DslSyntaxError("EXPLAIN (FORMAT SQL) prints the delta queries; it takes no "
                                 "ANALYZE or VERBOSE", text, toks[0].start)
        rest = toks[i:]
        if not rest:
            raise DslSyntaxError("syntax error: EXPLAIN needs a statement to explain", text,
                                 chunk.end)
        inner_chunk = Chunk(rest[0].start, chunk.end, tuple(rest))
        if is_ours(inner_chunk, options):
            raise DslSyntaxError("EXPLAIN applies to queries (SQL with occlusion(...)), not to "
                                 f"{rest[0].upper}", text, rest[0].start)
        inner = _sql(text, inner_chunk, rest)
        if not inner.calls:  # DuckDB's own EXPLAIN of plain SQL
            if flags["ablation"] or flags["format"] in ("json", "sql"):
                raise DslSyntaxError("EXPLAIN ABLATION / FORMAT JSON / FORMAT SQL need a query "
                                     "with occlusion(...)", text, rest[0].start)
            return _sql(text, chunk, toks)
        return dsl_ast.Explain(chunk.start, chunk.end, inner=inner, **flags)
    if is_ours(chunk, options):
        stmt = _parse_rule(text, chunk.start, chunk.end, "statement")
        stmt.start, stmt.end = chunk.start, chunk.end
        return stmt
    return _sql(text, chunk, toks)


def parse(text: str, options=frozenset()) -> list[dsl_ast.Statement]:
    """All statements of a script. ``options``: names SET/RESET treat as ours (lower case)."""
    return [parse_statement(text, c, options) for c in split(text)]
