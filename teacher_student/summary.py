"""The per-cycle table printed at the end of a run (summary.json holds the same numbers)."""
from __future__ import annotations


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def dig(d: dict | None, *keys):
    """``d[k1][k2]...``, or None as soon as a level is missing (summary.json sections are optional)."""
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def format_summary(summary: dict) -> str:
    """One row per generation and per reference model: classifier AUC/accuracy (OOF, test),
    detector mAP (OOF, test), the pseudo labels the generation's folds trained on and their
    precision against hidden truth; then the gains against the named baselines."""
    pseudo = {c["cycle"]: c.get("pseudo", {}) for c in summary.get("cycles", [])}
    lines = class_box_lines(summary, pseudo)
    lines += mask_lines(summary, pseudo)
    lines += grader_lines(summary)
    lines += gain_lines(summary.get("gains") or {})
    gate = summary.get("gate")
    if gate:
        lines.append(f"gate ({gate.get('mode')}, low {_fmt(gate.get('low'), 2)}, high {_fmt(gate.get('high'), 2)}): "
                     f"test mAP with 'No finding' {_fmt(dig(gate, 'test', 'ungated'))} -> {_fmt(dig(gate, 'test', 'gated'))}")
    lines.append(f"wall time {summary.get('wall_seconds', 0):.0f} s")
    return "\n".join(lines)


def class_box_lines(summary: dict, pseudo: dict) -> list[str]:
    """Classifier and detector rows; none when the run trained neither (a segmenter-only run)."""
    gens = summary.get("generations", [])
    if not any(g.get("classifier") or g.get("detector") for g in gens):
        return []
    head = (f"{'gen':>4} {'classifier':<18} {'AUC oof':>8} {'AUC test':>8} {'acc test':>8} "
            f"{'detector':<16} {'mAP oof':>8} {'mAP test':>8} {'pseudo':>7} {'prec':>6} {'boxes':>6} {'bprec':>6}")
    lines = [head, "-" * len(head)]
    for g in gens:
        p = pseudo.get(g["generation"], {})
        trained = (dig(p, "classifier", "students", "total"), dig(p, "classifier", "students", "precision"),
                   dig(p, "detector", "students", "total"), dig(p, "detector", "students", "precision"))
        lines.append(_row(str(g["generation"]), g.get("model"), g.get("detector_model"), g, trained))
    for tag, key, note in (("abl", "ablation", "student recipe, labeled only"),
                           ("orc", "oracle", "student recipe, every label, longer")):
        ref = summary.get(key)
        if ref:
            lines.append(_row(tag, ref.get("classifier_model"), ref.get("detector_model"), ref, None) + f"  ({note})")
    return lines


def _row(tag: str, model, det_model, rec: dict, trained: tuple | None) -> str:
    c, d = rec.get("classifier") or {}, rec.get("detector") or {}
    n_cls, p_cls, n_box, p_box = trained or (None, None, None, None)
    return (f"{tag:>4} {str(model or ''):<18} {_fmt(dig(c, 'oof', 'auc_macro')):>8} {_fmt(dig(c, 'test', 'auc_macro')):>8} "
            f"{_fmt(dig(c, 'test', 'accuracy')):>8} {str(det_model or '-'):<16} {_fmt(dig(d, 'oof', 'map')):>8} "
            f"{_fmt(dig(d, 'test', 'map')):>8} {str(n_cls if n_cls is not None else '-'):>7} {_fmt(p_cls, 2):>6} "
            f"{str(n_box if n_box is not None else '-'):>6} {_fmt(p_box, 2):>6}")


def mask_lines(summary: dict, pseudo: dict) -> list[str]:
    """Segmenter rows (runs with masks): mean per-image dice OOF and test, pseudo masks and their
    dice against hidden truth, and the cascade."""
    rows = [(str(g["generation"]), g) for g in summary.get("generations", []) if g.get("segmenter")]
    rows += [(tag, summary[key]) for tag, key in (("abl", "ablation"), ("orc", "oracle"))
             if (summary.get(key) or {}).get("segmenter")]
    if not rows:
        return []
    head = f"{'gen':>4} {'segmenter':<28} {'dice oof':>8} {'dice test':>9} {'IoU test':>8} {'masks':>6} {'mdice':>6}"
    out = ["", head, "-" * len(head)]
    for tag, g in rows:
        s, p = g["segmenter"], pseudo.get(g.get("generation"), {}) if tag.isdigit() else {}
        n, prec = dig(p, "segmenter", "students", "total"), dig(p, "segmenter", "students", "precision")
        out.append(f"{tag:>4} {str(g.get('segmenter_model') or ''):<28} {_fmt(dig(s, 'oof', 'dice')):>8} "
                   f"{_fmt(dig(s, 'test', 'dice')):>9} {_fmt(dig(s, 'test', 'iou')):>8} "
                   f"{str(n if n is not None else '-'):>6} {_fmt(prec, 2):>6}")
    cascade = summary.get("cascade")
    if cascade:
        out.append(f"cascade ({cascade.get('mode')}, P(positive) >= {_fmt(cascade.get('threshold'), 2)}, pixel "
                   f"{_fmt(cascade.get('pixel_threshold'), 2)}): test dice {_fmt(dig(cascade, 'test', 'ungated'))} -> "
                   f"{_fmt(dig(cascade, 'test', 'gated'))}")
    return out


def grader_lines(summary: dict) -> list[str]:
    """The ordinal grader, when the run has one: QWK OOF and test per generation and reference,
    and the pseudo grades the students trained on (exact agreement with hidden truth)."""
    gens = [g for g in summary.get("generations", []) if g.get("grader")]
    if not gens:
        return []
    pseudo = {c["cycle"]: dig(c, "pseudo", "grader", "students") or {} for c in summary.get("cycles", [])}
    lines = [f"{'grader':>10} {'model':<18} {'QWK oof':>8} {'QWK test':>8} {'pseudo':>7} {'prec':>6}"]
    rows = [(f"gen {g['generation']}", g.get("grader_model"), g, pseudo.get(g["generation"], {})) for g in gens]
    rows += [(tag, (summary.get(key) or {}).get("grader_model"), summary.get(key), {})
             for tag, key in (("ablation", "ablation"), ("oracle", "oracle")) if dig(summary, key, "grader")]
    for tag, model, rec, p in rows:
        lines.append(f"{tag:>10} {str(model or ''):<18} {_fmt(dig(rec, 'grader', 'oof', 'qwk')):>8} "
                     f"{_fmt(dig(rec, 'grader', 'test', 'qwk')):>8} {str(p.get('total', '-')):>7} "
                     f"{_fmt(p.get('precision'), 2):>6}")
    return lines


def gain_lines(gains: dict) -> list[str]:
    """The last student against its baselines on the held-out test part, one line per metric."""
    out = []
    for key, label in (("classifier_auc", "classifier AUC"), ("detector_map", "detector mAP"),
                       ("segmenter_dice", "segmenter dice"), ("grader_qwk", "grader QWK")):
        g = gains.get(key)
        if not g:
            continue
        gap = g.get("gap_closed")
        gap_text = _fmt(gap, 2) if isinstance(gap, (int, float)) else str(gap)
        out.append(f"{label} (test): student - ablation {_signed(g.get('student_minus_ablation'))} "
                   f"(the pseudo labels), student - teacher {_signed(g.get('student_minus_teacher'))}, "
                   f"gap closed {gap_text}")
    return out


def _signed(value) -> str:
    return "-" if value is None else f"{value:+.3f}"
