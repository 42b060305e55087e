"""Score generated talking videos against reference videos in the paper's terms.

    python scripts/evaluate.py --generated OUT --reference EVAL/reference [--audio EVAL/audio] \
        [--metrics fid fvd sync csim motion] [--models DIR] [--out report.json]

Pairs videos by name; writes a JSON report (per video and for the set: fid, fvd, sync_c, sync_d, sync_offset,
csim, motion) and a Markdown table, and prints the table. Features are cached per video file, so a rerun after
adding videos computes only the new ones. docs/evaluation.md has the whole loop and the model downloads.
"""

import sys

from memo.evaluation.command import main

if __name__ == "__main__":
    sys.exit(main())
