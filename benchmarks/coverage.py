"""The coverage sweep as a report: every causal-LM model type of the installed transformers,
classified by gaugefix.coverage (supported with its family and group, or why not).

    python benchmarks/coverage.py [--markdown] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import warnings
from pathlib import Path

from gaugefix.coverage import sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true", help="the README's family table")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = sweep()
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    counts = collections.Counter(r.status for r in rows)
    if args.markdown:
        fams: dict[str, list[str]] = collections.defaultdict(list)
        group = {}
        for r in rows:
            if r.status == "supported":
                fams[r.family].append(r.model_type)
                group[r.family] = r.group
        print("| family (rules) | model types | gauge group |\n|---|---|---|")
        for fam in sorted(fams):
            print(f"| {fam} | {', '.join(f'`{t}`' for t in sorted(fams[fam]))} | {group[fam]} |")
        refused = [r for r in rows if r.status == "refused"]
        if refused:
            print("\nRefused (no signed-permutation gauge exists; checked by the sweep):\n")
            print("| model type | why |\n|---|---|")
            for r in refused:
                print(f"| `{r.model_type}` | {r.detail.split(' (checked:')[0]} |")
        print()
        print(f"Of {len(rows)} causal-LM model types in this transformers: "
              + ", ".join(f"{n} {s}" for s, n in counts.most_common()) + ".")
        return
    for r in rows:
        print(f"{r.model_type:28s} {r.status:22s} {r.family or '':10s} {r.detail[:120]}")
    print(dict(counts))


if __name__ == "__main__":
    main()
