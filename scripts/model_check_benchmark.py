"""What checking every model before it loads costs (issue 29), measured on the tiny pack and at full size.

    python scripts/model_check_benchmark.py              # the tiny pack (built in a temporary folder)
    python scripts/model_check_benchmark.py --repeat 5

Measured in one process, the smallest of ``--repeat`` runs each:

- the checks of every model of a run (``memo.loading.locate_models``: each file's structure, each config against
  its class, each network built on the meta device against its weights' header), results not yet kept;
- the baseline: loading the four networks and the VAE (``MemoPipeline.from_checkpoint``, checks already kept),
  and the checks' time as a share of it;
- building each published network on the meta device from its published config (``../shared/reference``), the
  part of the checks that grows with the network: its Python modules, never its weights.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "published"


def best(repeat: int, run) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the smallest is shown")
    args = parser.parse_args()

    import memo.io.model_load as model_load
    from memo.loading import locate_models
    from memo.pipeline import NETWORKS, MemoPipeline
    from memo.settings.inference import load_config
    from memo.tiny.pack import write_tiny_pack

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_pack(Path(folder))
        config = load_config(Path(folder) / "inference.yaml", [])
        files = locate_models(config, need_emotion2vec=True)  # imports and first calls out of the way

        def checks() -> None:
            model_load._verified.clear()
            locate_models(config, need_emotion2vec=True)

        checked = best(args.repeat, checks)
        loaded = best(args.repeat, lambda: MemoPipeline.from_checkpoint(files.memo, vae=files.vae))
    print(f"tiny pack, CPU ({torch.get_num_threads()} threads):")
    print(f"  checks of every model (emotion2vec included): {checked:.2f} s")
    print(f"  loading the networks and the VAE (baseline):  {loaded:.2f} s")
    print(f"  checks / loading: {checked / loaded:.2f}")
    if REFERENCE.is_dir():
        print("full size, built on the meta device from the published configs:")
        for name, cls in NETWORKS.items():
            published = json.loads((REFERENCE / f"{name}.config.json").read_text())

            def build(cls=cls, published=published) -> None:
                with torch.device("meta"):
                    cls.from_config(published)

            print(f"  {name}: {best(args.repeat, build):.2f} s")


if __name__ == "__main__":
    main()
