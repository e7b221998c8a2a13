"""EXPLAIN ANALYZE of a recorded run, for the viewer's run page: the run's query in the
language (its model and image versions, patch, stride, colour, target, mode, tau, region,
drill-down), analyzed by the language's own EXPLAIN ANALYZE in a private in-memory session,
so the page shows exactly what ``krypton sql`` would; measured now, recorded nowhere."""

from __future__ import annotations

from ..errors import InputError
from ..session import connect


def _literal(v) -> str:
    """A setting's value as the language writes it."""
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_literal(x) for x in v) + ")"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_literal(x)}" for k, x in v.items()) + "}"
    raise InputError(f"cannot write {v!r} as a query literal")


def run_query(info: dict, model_name: str, image_name: str) -> str:
    """The ``occlusion(...)`` query of a recorded run (``Store.run``'s dict)."""
    s = info["settings"]
    if s.get("positions") == "listed":
        raise InputError(f"run {info['id']} occluded listed positions (an interactive query); "
                         "EXPLAIN ANALYZE re-runs grid queries only")
    args = [f"model => {_literal(model_name)}", f"image => {_literal(image_name)}",
            f"patch => {_literal(list(s['patch']))}", f"stride => {_literal(list(s['stride']))}",
            f"color => {_literal(s.get('color', 0.0))}", f"mode => {_literal(info['mode'])}"]
    if info.get("target_class") is not None:
        args.append(f"target => {int(info['target_class'])}")
    if s.get("region") is not None:
        args.append(f"region => {_literal(list(s['region']))}")
    if info["mode"] == "approximate" and s.get("tau") is not None:
        args.append(f"tau => {_literal(float(s['tau']))}")
    if s.get("precision", "fast") != "fast":
        args.append(f"precision => {_literal(s['precision'])}")
    if s.get("regions", "position") != "position":
        args.append(f"regions => {_literal(s['regions'])}")
    if s.get("score", "prob") != "prob":
        args.append(f"score => {_literal(s['score'])}")
    dd = s.get("drilldown")
    if dd:
        spec = {k: dd[k] for k in ("r", "speedup") if k in dd}  # 'refine' runs have no r
        if dd.get("select", "drop") != "drop":
            spec["select"] = dd["select"]
        args.append(f"drilldown => {_literal(spec)}")
    return "SELECT * FROM occlusion(" + ", ".join(args) + ")"


class RunAnalyzer:
    """A private in-memory session holding the models and images of analyzed runs."""

    def __init__(self):
        self._session = None

    def rows(self, info: dict, model, pixels) -> tuple[str, list[tuple[str, str]]]:
        """(the query, its EXPLAIN ANALYZE rows). Call under the viewer's compute gate."""
        if self._session is None:
            self._session = connect(":memory:")
        cat = self._session.catalog
        # one name per catalog version: a name never holds two contents here, so the
        # language's "latest version of the name" is the run's version
        mname = f"{info['model']}_v{info['model_version']}"
        iname = f"{info['image']}_v{info['image_version']}"
        cat.register_model(model, mname)
        cat.register_image(pixels, iname)
        text = run_query(info, mname, iname)
        return text, self._session.explain(text, analyze=True)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
