"""Evaluation results in a run folder: every JSON that ``ddpm eval ...`` writes, told apart by
its content (users name the files as they like).

    kind       written by                                   recognised by
    nll        ddpm eval nll (NLLResult.save)               total_bpd, terms_bpd, mse
    analytic   ddpm eval nll --var analytic                 analytic/fixedlarge/fixedsmall, paired
    gamma      Analytic-DPM's Gamma_n (analytic_var.json)   entries[] with gamma
    rd         ddpm eval rd                                 a list of {reverse_steps, rate_bpd, distortion_rmse}
    steps      ddpm eval steps                              {meta, rows[] with nfe, sampler, quality}
    guidance   ddpm eval guidance                           {meta, rows[] with guidance, agreement, fd}
    quality    ddpm eval quality                            fd, confidence, balance, class_histogram
    fid        ddpm eval fid                                fid, n_samples

Other JSON files are ignored; a ``.json`` that does not parse is reported, not fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Result", "classify", "find_results", "KINDS"]

KINDS = ("nll", "analytic", "rd", "steps", "guidance", "quality", "fid", "gamma")
SKIP_DIRS = {"samples", "checkpoints_tmp", "tb", "__pycache__"}
SKIP_FILES = {"config.json"}
MAX_BYTES = 64 << 20  # an evaluation result is small; a huge .json is something else
MAX_DEPTH = 3


@dataclass
class Result:
    kind: str
    path: Path
    data: Any
    mtime: float


def _rows(d: Any, *keys: str) -> bool:
    return (isinstance(d, dict) and isinstance(d.get("rows"), list) and bool(d["rows"])
            and all(isinstance(r, dict) and all(k in r for k in keys) for r in d["rows"]))


def classify(d: Any) -> str | None:
    """The kind of an evaluation result (see the module doc), or None."""
    if isinstance(d, list):
        if d and all(isinstance(r, dict) and {"reverse_steps", "rate_bpd", "distortion_rmse"} <= r.keys() for r in d):
            return "rd"
        return None
    if not isinstance(d, dict):
        return None
    if {"total_bpd", "terms_bpd", "mse"} <= d.keys():
        return "nll"
    if "paired" in d and all(isinstance(d.get(k), dict) for k in ("analytic", "fixedlarge", "fixedsmall")):
        return "analytic"
    if isinstance(d.get("entries"), list) and d["entries"] and all(
            isinstance(e, dict) and "gamma" in e for e in d["entries"]):
        return "gamma"
    if _rows(d, "nfe", "sampler", "quality"):
        return "steps"
    if _rows(d, "guidance", "agreement", "fd"):
        return "guidance"
    if {"fd", "confidence", "balance", "class_histogram"} <= d.keys():
        return "quality"
    if "fid" in d and "n_samples" in d:
        return "fid"
    return None


def candidates(root: Path, depth: int = 0) -> Iterable[Path]:
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.startswith("."):
            continue  # temporaries of ddpm.atomic and hidden files
        if p.is_dir():
            if depth < MAX_DEPTH and p.name not in SKIP_DIRS:
                yield from candidates(p, depth + 1)
        elif p.suffix == ".json" and p.name not in SKIP_FILES:
            yield p


def find_results(root: Path, extra: Iterable[Path] = ()) -> tuple[list[Result], list[tuple[Path, str]]]:
    """(results, unreadable): every evaluation JSON under ``root`` (and under each extra file or
    folder), sorted by kind then path; unreadable lists (path, why) for .json files that do not parse."""
    seen: set[Path] = set()
    found, bad = [], []
    paths = list(candidates(root))
    for e in extra:
        paths += [e] if e.is_file() else list(candidates(e))
    for p in paths:
        key = p.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            st = p.stat()
            if st.st_size > MAX_BYTES:
                continue
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            bad.append((p, type(e).__name__))
            continue
        kind = classify(d)
        if kind is not None:
            found.append(Result(kind, p, d, st.st_mtime))
    found.sort(key=lambda r: (KINDS.index(r.kind), str(r.path)))
    return found, bad


def headline(r: Result) -> dict[str, float]:
    """The numbers of a result that go into a comparison table (name -> value)."""
    d = r.data
    if r.kind == "nll":
        return {"bits/dim": d.get("total_bpd")}
    if r.kind == "analytic":
        return {f"bits/dim ({d.get('steps')} steps, analytic var)": d["analytic"].get("total_bpd")}
    if r.kind == "quality":
        return {"digits FD": d.get("fd"), "confidence": d.get("confidence")}
    if r.kind == "fid":
        return {"FID": d.get("fid")}
    if r.kind == "rd":
        return {"distortion at full rate (RMSE)": d[-1].get("distortion_rmse")}
    if r.kind == "guidance":
        best = min(d["rows"], key=lambda row: row["fd"])
        return {"best guidance FD": best["fd"]}
    if r.kind == "steps":
        best = min(d["rows"], key=lambda row: row["quality"])
        return {f"best {best.get('metric', 'quality')} over samplers": best["quality"]}
    return {}


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def describe_path(p: Path, root: Path) -> str:
    """The path relative to the run folder when inside it."""
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)
