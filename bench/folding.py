"""Feature extraction with and without batch norms folded into the convolutions.

    .venv/bin/python bench/folding.py [--backbones MobileNet EfficientNetLite0] [--images 3000] [--repeats 2]

Builds each backbone with its ImageNet weights at 224 px (MobileNet α=0.25's from
../shared/keras_home, copied into a temporary KERAS_HOME; EfficientNet-Lite0's come with
the app), then times `engine.features.compute_features` over the same random images with
the plain extractor (the model's own layers) and the folded one (`engine.folding`),
alternating, and prints seconds, images/second and the largest difference between the two.
Tracing is included in every timing, as in a training run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BACKBONES = {"MobileNet": 0.25, "EfficientNetLite0": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2)
    arguments = parser.parse_args()

    keras_home = Path(tempfile.mkdtemp(prefix="bench_folding_"))
    (keras_home / "models").mkdir()
    for weights_file in (SHARED / "keras_home" / "models").glob("*.h5"):
        shutil.copy(weights_file, keras_home / "models" / weights_file.name)
    os.environ.update(KERAS_HOME=str(keras_home), TRANSFER_STUDIO_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
    sys.path.insert(0, str(REPO))
    import numpy as np

    from engine.config import RunConfig
    from engine.features import build_feature_extractor, compute_features
    from engine.modeling import build_model

    images = np.random.default_rng(0).integers(0, 256, size=(arguments.images, 224, 224, 3), dtype=np.uint8)
    rows = []
    try:
        for backbone in arguments.backbones:
            config = RunConfig().replace(**{"data.path": str(REPO), "model.backbone": backbone,
                                            "model.alpha": BACKBONES[backbone], "model.image_size": 224})
            model = build_model(config, 2)
            seconds = {"plain": [], "folded": []}
            outputs = {}
            for _ in range(arguments.repeats):
                for kind in ("plain", "folded"):
                    started = time.perf_counter()
                    extractor = build_feature_extractor(model, fold=kind == "folded")
                    outputs[kind] = compute_features(extractor, images, list(range(len(images))))
                    seconds[kind].append(time.perf_counter() - started)
            difference = float(np.abs(outputs["folded"] - outputs["plain"]).max())
            scale = float(np.abs(outputs["plain"]).max())
            rows.append((backbone, seconds, difference, scale))
    finally:
        shutil.rmtree(keras_home, ignore_errors=True)

    print(f"\n{arguments.images} random images at 224 px, {os.cpu_count()} CPU cores; "
          f"seconds per run (building the extractor and tracing included), best of {arguments.repeats}\n")
    print("| backbone | plain s | folded s | plain img/s | folded img/s | speed-up | max difference (of max feature) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for backbone, seconds, difference, scale in rows:
        plain, folded = min(seconds["plain"]), min(seconds["folded"])
        print(f"| {backbone} | {plain:.2f} | {folded:.2f} | {arguments.images / plain:.0f} | "
              f"{arguments.images / folded:.0f} | {plain / folded:.2f}× | {difference:.1e} ({scale:.1f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
