"""The MEMO web app: a page to upload a portrait and speech and watch the talking video.

python app.py --config configs/inference.yaml [--port 7860] [--share] [key=value ...]
"""

import os
import sys

from memo.apps.web import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
