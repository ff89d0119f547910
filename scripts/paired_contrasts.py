"""Print the paired comparisons between methods of a finished study, from its cells; writes nothing.

The same table as REPORT.md's "Paired differences between methods", for studies whose report
predates that section (rebuilding their report with `benchmark --report-only` would also work,
but on another machine it could no longer name the machine their cells ran on).

usage: python scripts/paired_contrasts.py STUDY
  e.g. python scripts/paired_contrasts.py results/label-free-h200-v2
"""

import sys
from pathlib import Path

from pix2rep.evaluation.study import contrast_table, load_cells, summarise_contrasts

if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "cells").is_dir():
    sys.exit(__doc__.strip())
cells = load_cells(Path(sys.argv[1]) / "cells")
print("\n".join(contrast_table(summarise_contrasts(cells))))
