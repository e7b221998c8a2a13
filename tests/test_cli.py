"""The ``krypton`` command: ``sql -c``, ``sql FILE``, errors with carets and exit codes, and
``krypton shell`` driven through a real pseudo-terminal (pexpect): a multi-line statement,
its result, ``.help``, ``.tables``, ``.quit``, history written to $KRYPTON_HISTORY."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from test_dsl import small_net


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    onnx.save(small_net(), d / "small.onnx")
    Image.fromarray((np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8)).save(
        d / "scan_01.png")
    e = dict(os.environ, KRYPTON_HISTORY=str(d / "history"), KRYPTON_DB=str(d / "default.duckdb"),
             KRYPTON_COST_MODEL=str(d / "cost.json"))
    return d, e


def krypton(args, env, stdin=None):
    return subprocess.run([sys.executable, "-m", "krypton_db", *args], capture_output=True,
                          text=True, env=env, input=stdin, timeout=120)


@pytest.mark.slow
def test_sql_command_file_and_stdin(env):
    d, e = env
    cat = str(d / "cat.duckdb")
    r = krypton(["sql", "--catalog", cat, "-c",
                 f"CREATE MODEL tiny FROM '{d / 'small.onnx'}'; "
                 f"CREATE IMAGE scan_01 FROM '{d / 'scan_01.png'}'"], e)
    assert r.returncode == 0, r.stderr
    assert "tiny" in r.stdout and "scan_01" in r.stdout
    script = d / "q.sql"
    script.write_text("-- a script\nSET patch = 10;\nSET stride = 10;\n"
                      "SELECT y, x, round(prob, 4) AS p FROM occlusion('tiny', 'scan_01')\n"
                      "ORDER BY y, x;\n")
    r = krypton(["sql", "--catalog", cat, str(script)], e)
    assert r.returncode == 0, r.stderr
    assert "(4 rows)" in r.stdout and r.stdout.splitlines()[0].split() == ["y", "|", "x", "|", "p"]
    r = krypton(["sql", "--catalog", cat], e, stdin="SELECT count(*) AS n FROM runs;")
    assert r.returncode == 0 and "1" in r.stdout.splitlines()[2]
    r = krypton(["sql", "--catalog", cat, "-c",
                 "EXPLAIN occlusion('tiny', 'scan_01', patch => 4)"], e)
    assert "== delta_plan ==" in r.stdout and "== physical_plan ==" in r.stdout


def test_sql_errors_exit_nonzero_with_caret(env):
    d, e = env
    r = krypton(["sql", "--catalog", str(d / "err.duckdb"), "-c",
                 "SELECT *\nFROM occlusion(model => 'm' image => 'i');"], e)
    assert r.returncode == 1
    assert "line 2, column 29" in r.stderr and r.stderr.rstrip().endswith("^")
    r = krypton(["sql", "--catalog", str(d / "err.duckdb"), str(d / "missing.sql")], e)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_default_catalog_and_old_subcommands(env):
    d, e = env
    r = krypton(["sql", "-c", "SELECT count(*) FROM models"], e)
    assert r.returncode == 0 and (d / "default.duckdb").is_file()
    for sub in ("demo", "classify"):
        r = krypton([sub, "--help"], e)
        assert r.returncode == 0 and "usage: krypton " + sub in r.stdout


def spawn_shell(catalog: str, env):
    """``krypton shell`` in a real pseudo-terminal."""
    import pexpect

    return pexpect.spawn(sys.executable, ["-m", "krypton_db", "shell", "--catalog", catalog],
                         env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))


@pytest.mark.slow
def test_shell_in_a_terminal(env):
    import pexpect
    d, e = env
    child = spawn_shell(str(d / "shell.duckdb"), e)
    try:
        child.expect_exact("krypton> ")
        child.sendline(f"CREATE MODEL tiny FROM '{d / 'small.onnx'}';")
        child.expect_exact("(1 row)")
        child.expect_exact("krypton> ")
        child.sendline(f"CREATE IMAGE scan_01 FROM '{d / 'scan_01.png'}';")
        child.expect_exact("krypton> ")
        # a multi-line statement: continuation prompts until the ';'
        child.sendline("SELECT y, x, prob")
        child.expect_exact("...> ")
        child.sendline("FROM occlusion(model => 'tiny', image => 'scan_01',")
        child.expect_exact("...> ")
        child.sendline("              patch => 10, stride => 10)")
        child.expect_exact("...> ")
        child.sendline("ORDER BY prob LIMIT 2;")
        child.expect_exact("(2 rows)")
        child.expect_exact("krypton> ")
        child.sendline("SELECT * FROM occlusion('tiny', 'nope');")
        child.expect_exact("unknown image 'nope'")
        child.expect_exact("krypton> ")
        child.sendline(".help")
        child.expect_exact("Dot commands")
        child.expect_exact("krypton> ")
        child.sendline(".tables")
        child.expect_exact("heatmaps")
        child.expect_exact("krypton> ")
        child.sendline(".quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    hist = (d / "history").read_text()
    assert "ORDER BY prob LIMIT 2;" in hist and ".help" in hist


def _slow_net_files(d):
    """A net and image whose naive-mode occlusion at stride 1 takes several seconds."""
    from test_catalog_history import tiny_net

    onnx.save(tiny_net(3, size=96, width=16), d / "big.onnx")
    Image.fromarray((np.random.default_rng(2).random((96, 96, 3)) * 255).astype(np.uint8)).save(
        d / "big.png")
    return d / "big.onnx", d / "big.png"


SLOW_QUERY = ("SELECT count(*) FROM occlusion('big', 'big', patch => 4, stride => 1, "
              "mode => 'naive');")


@pytest.mark.slow
def test_ctrl_c_in_the_shell_cancels_the_statement_and_keeps_the_session(env):
    import time

    import pexpect

    d, e = env
    onnx_path, png = _slow_net_files(d)
    child = spawn_shell(str(d / "ctrlc.duckdb"), e)
    try:
        child.expect_exact("krypton> ")
        child.sendline(f"CREATE MODEL big FROM '{onnx_path}'; CREATE IMAGE big FROM '{png}';")
        child.expect_exact("krypton> ")
        child.sendline("SET patch = 4;")
        child.expect_exact("krypton> ")
        child.sendline(SLOW_QUERY)
        time.sleep(2.0)  # inside the computation
        # one Ctrl-C cancels it here; in one cold-cache CI run the first was not acted on
        # (not reproduced since), so up to three presses, as a user would
        for attempt in range(3):
            child.sendintr()
            if child.expect_exact(["cancelled", pexpect.TIMEOUT], timeout=15) == 0:
                break
        else:
            raise AssertionError("three Ctrl-C did not cancel the statement")
        child.expect_exact("krypton> ")
        # the session goes on: its options are still set and a statement runs
        child.sendline("SHOW OPTIONS;")
        child.expect(r"patch\s*\|\s*\(4, 4\)")
        child.expect_exact("krypton> ")
        child.sendline("SELECT count(*) AS n FROM occlusion('big', 'big', stride => 46);")
        child.expect_exact("(1 row)")
        child.expect_exact("krypton> ")
        child.sendline("SELECT count(*) AS runs FROM runs;")
        child.expect(r"runs\s*\r?\n-+\r?\n1\s")  # the cancelled statement recorded nothing
        child.expect_exact("krypton> ")
        child.sendline(".quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc; elsewhere the wall time
    it has run is not known here, so 4 s are assumed once 3 s have passed)."""
    import os

    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        import time

        time.sleep(3.0)
        return 4.0


@pytest.mark.slow
@pytest.mark.parametrize("cpu_s", [0.4, 4.0], ids=["while-importing", "while-computing"])
def test_ctrl_c_in_krypton_sql_exits_130_with_one_line(env, cpu_s):
    """Ctrl-C ends ``krypton sql`` with one line and exit 130 both while the engine's modules
    still load (the child has used 0.4 s of CPU: past the interpreter's start-up, inside the
    numba / duckdb imports) and while the query computes (4 s: the imports take ~2 s of CPU).
    CPU time, not wall time: under load a fixed wall-clock delay lands anywhere."""
    import signal
    import time

    d, e = env
    onnx_path, png = _slow_net_files(d)
    cat = str(d / f"ctrlc_sql_{cpu_s}.duckdb")
    r = krypton(["sql", "--catalog", cat, "-c", f"CREATE MODEL big FROM '{onnx_path}'; "
                 f"CREATE IMAGE big FROM '{png}'"], e)
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen([sys.executable, "-m", "krypton_db", "sql", "--catalog", cat, "-c",
                          SLOW_QUERY], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 60
        while _cpu_seconds(p.pid) < cpu_s and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:  # never leave the computation running behind a failed test
        p.kill()
        p.wait()
    assert p.returncode == 130, (out, err)
    assert err.strip() == "krypton: interrupted"
    r = krypton(["sql", "--catalog", cat, "-c", "SELECT count(*) FROM runs"], e)
    assert r.returncode == 0 and r.stdout.splitlines()[2].strip() == "0"


def test_ctrl_c_wrapped_by_python_still_exits_130(monkeypatch, capsys):
    """A Ctrl-C that Python re-raises wrapped (a KeyboardInterrupt inside a class body's
    ``__set_name__`` becomes RuntimeError 'Error calling __set_name__' in 3.11, seen when it
    lands in numba's imports) ends like any Ctrl-C: one line, exit 130; other errors stay
    internal errors (70)."""
    from krypton_db import cli

    def interrupted(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            raise RuntimeError("Error calling __set_name__ on 'cached_property' instance") from ki

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["sql", "-c", "SHOW MODELS"]) == 130
    assert capsys.readouterr().err.strip() == "krypton: interrupted"
    monkeypatch.setattr(cli, "_run", lambda args: 1 / 0)
    assert cli.main(["sql", "-c", "SHOW MODELS"]) == 70
    assert "internal error: ZeroDivisionError" in capsys.readouterr().err


def test_dataset_command(env, tmp_path):
    """``krypton dataset``: a folder into Parquet parts and the catalog, exit 1 when an image
    failed (named on stdout); a rerun skips what is done (the broken image fails again)."""
    import duckdb

    import krypton_db as kdb

    d, e = env
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(imgs / f"s{i}.png")
    (imgs / "broken.png").write_bytes(b"not a png")
    args = ["dataset", str(d / "small.onnx"), str(imgs), "--patch", "4", "--stride", "4",
            "--out", str(tmp_path / "out"), "--catalog", str(tmp_path / "c.duckdb")]
    p = krypton(args, e)
    assert p.returncode == 1, p.stderr
    assert "2 done, 1 failed, 0 skipped" in p.stdout and "failed: " in p.stdout
    assert "broken.png" in p.stdout
    got = duckdb.connect().execute(
        f"SELECT image, y, x, prob FROM read_parquet('{tmp_path}/out/*/*.parquet') "
        "WHERE image LIKE '%s0.png' ORDER BY y, x").fetchnumpy()
    hm = kdb.occlude(kdb.load_model(d / "small.onnx"), imgs / "s0.png", patch=4, stride=4,
                     progress=False)
    np.testing.assert_array_equal(got["prob"], hm.probs.reshape(-1).astype(np.float32))
    again = krypton(args, e)
    assert again.returncode == 1 and "0 done, 1 failed, 2 skipped" in again.stdout
    bad = krypton(["dataset", str(d / "small.onnx"), str(tmp_path / "none" / "*.png")], e)
    assert bad.returncode == 2 and "no files match" in bad.stderr


def test_version_is_the_projects_and_loads_no_engine(env):
    """``krypton --version``: the version pyproject.toml declares (the package's
    ``__version__`` too), printed without loading numba, duckdb or onnx."""
    import tomllib

    _, e = env
    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    probe = ("import runpy, sys; sys.argv = ['krypton', '--version']\n"
             "try:\n    runpy.run_module('krypton_db', run_name='__main__')\n"
             "except SystemExit as exc:\n    code = exc.code\n"
             "heavy = sorted(m for m in ('numba', 'duckdb', 'onnx') if m in sys.modules)\n"
             "print('exit', code, 'loaded', heavy)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=e, timeout=60)
    assert r.stdout.splitlines() == [f"krypton_db {declared}", "exit 0 loaded []"], r.stderr
    import krypton_db

    assert krypton_db.__version__ == declared
