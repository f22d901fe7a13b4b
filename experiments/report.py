"""``python -m experiments.report RUN_DIR... [--out DIR] [--title TEXT]``: one paper-style report of
several runs of one protocol (seeds, machines): accuracy vs sparsity on the ``1 - 0.8**k`` ladder
with mean ± std over the seeds, effective sparsity and cost. See :mod:`prospr_jax.experiment.merge`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from prospr_jax.experiment.merge import default_title, merge_records, write_merged_report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Merge the runs, write ``report.md`` and ``accuracy.png``; returns the exit status (2: bad runs)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or results.jsonl files)")
    parser.add_argument("--out", default="report", help="directory of report.md and accuracy.png (default: report)")
    parser.add_argument("--title", help="title of the table and the plot (default: model, data, epochs, seeds)")
    args = parser.parse_args(argv)
    try:
        records = merge_records(args.runs)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    text, md_path, png_path = write_merged_report(records, args.out, args.title or default_title(records))
    print(f"{text}\ntable: {md_path}\nplot:  {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
