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
    """One row per generation: classifier AUC/accuracy (OOF, test), detector mAP (OOF, test),
    pseudo labels the generation trained on and their precision against hidden truth."""
    head = (f"{'gen':>3} {'classifier':<18} {'AUC oof':>8} {'AUC test':>8} {'acc test':>8} "
            f"{'detector':<16} {'mAP oof':>8} {'mAP test':>8} {'pseudo':>7} {'prec':>6} {'boxes':>6} {'bprec':>6}")
    lines = [head, "-" * len(head)]
    pseudo = {c["cycle"]: c.get("pseudo", {}) for c in summary.get("cycles", [])}
    for g in summary.get("generations", []):
        c, d, p = g.get("classifier") or {}, g.get("detector") or {}, pseudo.get(g["generation"], {})
        lines.append(
            f"{g['generation']:>3} {str(g.get('model', '')):<18} {_fmt(dig(c, 'oof', 'auc_macro')):>8} "
            f"{_fmt(dig(c, 'test', 'auc_macro')):>8} {_fmt(dig(c, 'test', 'accuracy')):>8} "
            f"{str(g.get('detector_model', '-')):<16} {_fmt(dig(d, 'oof', 'map')):>8} {_fmt(dig(d, 'test', 'map')):>8} "
            f"{str(dig(p, 'classifier', 'after_balance') or '-'):>7} {_fmt(dig(p, 'classifier', 'precision'), 2):>6} "
            f"{str(dig(p, 'detector', 'boxes') or '-'):>6} {_fmt(dig(p, 'detector', 'precision'), 2):>6}")
    oracle = summary.get("oracle")
    if oracle:
        lines.append(f"{'orc':>3} {str(oracle.get('model', '')):<18} {'':>8} "
                     f"{_fmt(dig(oracle, 'classifier', 'test', 'auc_macro')):>8} "
                     f"{_fmt(dig(oracle, 'classifier', 'test', 'accuracy')):>8} {'':<16} {'':>8} "
                     f"{_fmt(dig(oracle, 'detector', 'test', 'map')):>8}   (supervised on all labels)")
    gap = summary.get("gap_closed")
    if gap:
        lines.append("gap closed by the last student (test): " + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in gap.items()))
    gate = summary.get("gate")
    if gate:
        lines.append(f"gate ({gate.get('mode')}, low {_fmt(gate.get('low'), 2)}, high {_fmt(gate.get('high'), 2)}): "
                     f"test mAP with 'No finding' {_fmt(dig(gate, 'test', 'ungated'))} -> {_fmt(dig(gate, 'test', 'gated'))}")
    lines.append(f"wall time {summary.get('wall_seconds', 0):.0f} s")
    return "\n".join(lines)
