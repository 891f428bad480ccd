"""The report's first lines: what the students got, how precise it was, and what to check.

Why a headline: a reader opens the page to decide whether to trust the cycle, and the answer is a
sentence, not a table. What the students trained on is the per-fold selections
(``pseudo/fold<k>/*.json``: student fold k learns only from teacher fold k), not the ensemble's
selection the sections below judge, so the sentence sums those; the hidden truth (demo data) says
how right they were. Classes that starve (nothing kept, or a threshold read off too few OOF
predictions) and the fallback applied to them are flagged in red: a student that learns nothing of
a class, or learns it from a coin toss, must not pass unnoticed.

The pure functions (:func:`students_per_class`, :func:`starving_groups`, :func:`verdict_sentence`)
take plain dicts, so tests check them on hand-made records.
"""
from __future__ import annotations

from ..layout import CLASSIFIER, DETECTOR
from .html import Report, esc
from .run_reader import CycleData

NAMES_SHOWN = 6
"""Class names listed in one flag before "and N more"."""


def students_per_class(fold_infos: list[dict], count_key: str) -> dict[str, dict]:
    """Per class, summed over the student folds: pseudo labels (``n``), the share right against the
    hidden truth (weighted by each fold's count; None without truth) and how many the top-k
    fallback kept."""
    out: dict[str, dict] = {}
    for info in fold_infos:
        precision = info.get("precision_per_class") or {}
        for name, n in (info.get(count_key) or {}).items():
            row = out.setdefault(name, {"n": 0, "right": 0.0, "judged": 0, "fallback": 0})
            row["n"] += int(n)
            if precision.get(name) is not None:
                row["right"] += float(precision[name]) * int(n)
                row["judged"] += int(n)
        for name, n in (info.get("fallback") or {}).items():
            out.setdefault(name, {"n": 0, "right": 0.0, "judged": 0, "fallback": 0})["fallback"] += int(n)
    return {name: {"n": r["n"], "precision": r["right"] / r["judged"] if r["judged"] else None,
                   "fallback": r["fallback"]} for name, r in out.items()}


def _total_precision(per_class: dict[str, dict]) -> float | None:
    judged = [(r["precision"], r["n"]) for r in per_class.values() if r["precision"] is not None and r["n"]]
    n = sum(k for _, k in judged)
    return sum(p * k for p, k in judged) / n if n else None


def _counts_text(per_class: dict[str, dict]) -> str:
    parts = []
    for name, r in sorted(per_class.items(), key=lambda kv: -kv[1]["n"]):
        if r["n"]:
            parts.append(f"{name} {r['n']}" + (f" at {r['precision']:.0%}" if r["precision"] is not None else ""))
    return "; ".join(parts)


def verdict_sentence(*, cycle: int, folds: int, classes: dict[str, dict] | None, boxes: dict[str, dict] | None,
                     negatives: int | None = None, has_truth: bool = False) -> str:
    """One sentence: what the cycle's students trained on, per class, and how precise it was.

    Args:
        classes, boxes: :func:`students_per_class` of the classifier and detector students (None:
            that task is not in the run).
        negatives: pool images the detector students learned as "no finding".
        has_truth: the pool has hidden truth; without it precision is said to be unknown.
    """
    head = f"Cycle {cycle}'s students ({folds} folds, each trained on its own teacher fold's pseudo labels) got"
    parts = []
    for what, per_class in (("pseudo labels", classes), ("pseudo boxes", boxes)):
        if per_class is None:
            continue
        total = sum(r["n"] for r in per_class.values())
        if not total:
            parts.append(f"no {what}")
            continue
        precision = _total_precision(per_class)
        right = (f", {precision:.0%} right against the hidden truth" if precision is not None
                 else ", precision unknown (no hidden truth: see the OOF estimates below)" if not has_truth else "")
        parts.append(f"{total} {what}{right} ({_counts_text(per_class)})")
    if negatives:
        parts.append(f"{negatives} negative image{'' if negatives == 1 else 's'} (no finding)")
    if not parts:
        return f"Cycle {cycle} made no pseudo labels."
    text = head + " " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
    if all(p.startswith("no ") for p in parts):
        text += ": they learned from the labeled images only"
    return text + "."


def starving_groups(fold_infos: list[dict], count_key: str = "kept_per_class") -> list[dict]:
    """Starving classes grouped by what starves them, with the folds, the fallback's count and what
    the selections kept of them anyway (``count_key``: the per-class counts of a fold's record;
    fallback ``none`` keeps a weak-evidence class's labels, flagged): ``[{"classes": [...],
    "reason": ..., "folds": [...], "fallback": n, "kept": n, "mode": ...}, ...]``. A threshold of
    'never' (None in the record) is named as such: nothing on OOF reached the target precision."""
    per_class: dict[str, dict] = {}
    for fold, info in enumerate(fold_infos):
        thresholds = info.get("thresholds") or {}
        for name, why in (info.get("starving") or {}).items():
            if name in thresholds and thresholds[name] is None and "threshold" in why and "rests on" not in why:
                why = "threshold 'never' (no OOF score reaches the target precision)"
            row = per_class.setdefault(name, {"reasons": set(), "folds": [], "fallback": 0, "kept": 0, "mode": None})
            row["reasons"].add(why)
            row["folds"].append(fold)
            row["fallback"] += int((info.get("fallback") or {}).get(name, 0))
            row["kept"] += int((info.get(count_key) or {}).get(name, 0))
            row["mode"] = info.get("fallback_mode", row["mode"])
    groups: dict[tuple, dict] = {}
    for name, row in per_class.items():
        key = (tuple(sorted(row["reasons"])), tuple(row["folds"]), row["fallback"] > 0, row["kept"] > 0, row["mode"])
        group = groups.setdefault(key, {"classes": [], "reason": "; ".join(key[0]), "folds": list(key[1]), "fallback": 0,
                                        "kept": 0, "mode": row["mode"]})
        group["classes"].append(name)
        group["fallback"] += row["fallback"]
        group["kept"] += row["kept"]
    return list(groups.values())


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def flag_lines(what: str, groups: list[dict], folds: int) -> list[str]:
    """Plain-words red flags from :func:`starving_groups`."""
    lines = []
    for g in groups:
        where = "every fold" if len(g["folds"]) == folds else "fold" + ("s " if len(g["folds"]) > 1 else " ") + \
            ", ".join(map(str, g["folds"]))
        n = len(g["classes"])
        if g["fallback"]:
            fix = f"the top-k fallback kept {g['fallback']} in their place"
        elif g.get("kept"):
            fix = f"kept anyway on that evidence: {g['kept']}, flagged (fallback {g.get('mode') or 'none'})"
        else:
            fix = "the student learns nothing of " + ("it" if n == 1 else "them")
        lines.append(f"{what} {_names(g['classes'])}{f' ({n})' if n > 1 else ''} starve{'s' if n == 1 else ''} in "
                     f"{where}: {g['reason']}; {fix}.")
    return lines


def check_lines(class_rows: list[dict], box_rows: list[dict]) -> list[str]:
    """What a reader should look at next: classes whose kept pseudo labels are not trusted."""
    out = []
    for row in class_rows + box_rows:
        kind = "class" if row["kind"] == "class" else "box class"
        if row["verdict"] in ("do not use", "review") and row["kept"]:
            out.append(f"{row['verdict']}: {kind} {row['name']} — {row['rule']}")
    return out


def headline_section(d: CycleData, r: Report, class_rows: list[dict], box_rows: list[dict],
                     status: str | None = None) -> None:
    """The headline box at the top of the page (and ``report.json["headline"]``)."""
    folds = d.cfg.folds.k
    cls_infos, box_infos = d.fold_infos.get(CLASSIFIER) or [], d.fold_infos.get(DETECTOR) or []
    classes = students_per_class(cls_infos, "kept_per_class") if cls_infos else None
    boxes = students_per_class(box_infos, "per_class") if box_infos else None
    negatives = sum(int((i.get("images") or {}).get("negative", 0)) for i in box_infos) if box_infos else None
    if not cls_infos:  # a run from before per-fold selections: the ensemble's selection is all there is
        classes = {name: {"n": int(n), "precision": (d.class_info.get("precision_per_class") or {}).get(name),
                          "fallback": 0} for name, n in (d.class_info.get("kept_per_class") or {}).items()}
    sentence = verdict_sentence(cycle=d.cycle, folds=folds, classes=classes, boxes=boxes, negatives=negatives,
                                has_truth=d.truth is not None)
    flags = (flag_lines("Class", starving_groups(cls_infos), folds)
             + flag_lines("Box class", starving_groups(box_infos, "per_class"), folds))
    checks = check_lines(class_rows, box_rows)
    html = [f'<div class="headline"><p class="sentence">{esc(sentence)}</p>']
    if status:
        html.append(f'<p class="status">{esc(status)}</p>')
    if flags:
        html.append('<ul class="flags">' + "".join(f"<li>{esc(f)}</li>" for f in flags) + "</ul>")
    if checks:
        html.append('<p class="checks-title">Check before training on them:</p><ul class="checks">' +
                    "".join(f"<li>{esc(c)}</li>" for c in checks) + "</ul>")
    elif not flags:
        html.append("<p>No class is flagged: every class with pseudo labels is trusted at its threshold.</p>")
    html.append("</div>")
    r.add("".join(html))
    r.data["headline"] = {"sentence": sentence, "flags": flags, "checks": checks, "status": status,
                          "students": {"classifier": classes, "detector": boxes, "negatives": negatives}}
