"""How often two ``agrivlm infer`` runs gave the same answers: a GPU run against the CPU's, bfloat16 against float32.

Reads the journals ``agrivlm infer`` writes beside its output (``<out>.journal.jsonl``: every chip's questions'
answer texts, in order) and, per pair, counts the chips both answered and the answers whose text is identical.
Greedy decoding on the same weights and inputs gives the same text unless the arithmetic differs enough to flip a
token, so float32 on a GPU should match the CPU exactly and bfloat16 nearly.

    python benchmarks/compare_answers.py REF.journal.jsonl OTHER.journal.jsonl [MORE ...] --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def journal_answers(path: Path) -> dict[str, list[str]]:
    """``{chip_id: [answer text, ...]}`` of one journal (chips in ``chips`` records; header lines skipped)."""
    out: dict[str, list[str]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"{path}:{n}: not a JSON line of an agrivlm infer journal") from None
        for chip in rec.get("chips") or []:
            out[str(chip["chip_id"])] = [str(a["text"]) for a in chip.get("answers", [])]
    return out


def compare(ref: dict[str, list[str]], other: dict[str, list[str]]) -> dict[str, int]:
    """Chips of each, chips of both, answers compared (of both) and identical answers."""
    both = sorted(set(ref) & set(other))
    compared = sum(min(len(ref[c]), len(other[c])) for c in both)
    same = sum(a == b for c in both for a, b in zip(ref[c], other[c], strict=False))  # may differ in count
    return {"chips_ref": len(ref), "chips_other": len(other), "chips_both": len(both), "answers": compared,
            "identical": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", type=Path, help="the reference run's journal (e.g. CPU float32)")
    ap.add_argument("others", type=Path, nargs="+", help="journals to compare with it")
    ap.add_argument("--out", type=Path, default=None, help="write the counts as JSON")
    args = ap.parse_args()
    ref = journal_answers(args.ref)
    rows = {str(p): compare(ref, journal_answers(p)) for p in args.others}
    for path, r in rows.items():
        share = r["identical"] / r["answers"] if r["answers"] else float("nan")
        print(f"{path}: {r['identical']}/{r['answers']} answers identical to {args.ref.name} ({share:.1%}), "
              f"chips {r['chips_both']} of {r['chips_ref']}")
    if args.out:
        args.out.write_text(json.dumps({"ref": str(args.ref), "compared": rows}, indent=2))
    if any(r["chips_both"] == 0 for r in rows.values()):
        sys.exit(f"no chip in common with {args.ref}")


if __name__ == "__main__":
    main()
