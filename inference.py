"""Generate a talking video from one portrait and one audio file.

python inference.py --config configs/inference.yaml --input_image IMAGE --input_audio AUDIO --output_dir OUT
"""

import sys

from memo.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
