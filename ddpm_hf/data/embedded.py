"""The Fashion-MNIST subset shipped in this package (``embedded:fashion_mnist``), and the writer of its parquet shards
from the IDX files (``ddpm-hf data fashion-mnist``)."""

import gzip
import hashlib
import io
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from PIL import Image


EMBEDDED_DIR = Path(__file__).parent.parent / "embedded" / "fashion_mnist"
EMBEDDED_NAME = "embedded:fashion_mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# Decompressed md5 of the upstream IDX files (they match Debian's package; shared/research/data-metrics.md §1.1).
FASHION_MNIST_MD5 = {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                     "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                     "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                     "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"}


def read_idx(path: str, name: str) -> np.ndarray:
    """The array of the Fashion-MNIST IDX file ``path`` (gzipped; ``name`` its upstream name, whose md5 it must have):
    images (N, 28, 28) or labels (N,), uint8."""
    raw = gzip.open(path).read()
    digest = hashlib.md5(raw).hexdigest()
    if digest != FASHION_MNIST_MD5[name]:
        raise ValueError(f"{path}: md5 {digest} differs from the published {FASHION_MNIST_MD5[name]}; the file is not "
                         "the original Fashion-MNIST.")
    if "images" in name:
        return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    return np.frombuffer(raw, np.uint8, offset=8)


def write_fashion_mnist(out_dir: str, source: str = DEBIAN_FASHION_MNIST, train_limit: Optional[int] = None,
                        test_limit: Optional[int] = None, num_shards: int = 8) -> Path:
    """Convert the Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist`` package puts them in
    /usr/share/datasets/fashion-mnist) into ``out_dir/data/{train,test}-0000k-of-0000n.parquet`` with an ``image``
    (PNG) and a ``label`` column, plus a dataset card. ``*_limit`` keeps the first N images of a split. ``source``
    ``embedded`` (or ``embedded:fashion_mnist``) writes the subset shipped in this package instead: a dataset folder to
    push to a Hub, or to shard otherwise, on a machine without the package."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    if num_shards < 1 or num_shards % 8 and num_shards not in (1, 2, 4):
        raise ValueError("num_shards must be 1, 2, 4 or a multiple of 8, so that it divides the usual world sizes.")
    files = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", train_limit),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", test_limit)}
    embedded = source in ("embedded", EMBEDDED_NAME)
    missing = [] if embedded else [path for names in files.values() for name in names[:2]
                                   if not os.path.isfile(path := os.path.join(source, f"{name}.gz"))]
    if missing:  # all four looked for before anything is written
        raise FileNotFoundError(f"{missing[0]} not found: install Debian's package (apt-get install "
                                "dataset-fashion-mnist), or pass the folder holding the four IDX .gz files with "
                                "--source (Python: source=), or --source embedded for the subset this package ships.")
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
    counts = {}
    for split, (images_name, labels_name, limit) in files.items():
        if embedded:
            dataset = Dataset.from_parquet(sorted(str(p) for p in EMBEDDED_DIR.glob(f"data/{split}-*.parquet")))
            dataset = dataset.select(range(min(limit or len(dataset), len(dataset))))
        else:
            paths = [os.path.join(source, f"{n}.gz") for n in (images_name, labels_name)]
            images, labels = read_idx(paths[0], images_name)[:limit], read_idx(paths[1], labels_name)[:limit]

            def rows(images=images, labels=labels):
                for image, label in zip(images, labels):
                    buffer = io.BytesIO()
                    Image.fromarray(image, "L").save(buffer, format="PNG", optimize=True)
                    yield {"image": {"bytes": buffer.getvalue(), "path": None}, "label": int(label)}

            dataset = Dataset.from_generator(rows, features=features)
        counts[split] = len(dataset)
        for old in out.glob(f"data/{split}-*.parquet"):
            old.unlink()
        for k in range(num_shards):
            dataset.shard(num_shards, k, contiguous=True).to_parquet(
                str(out / "data" / f"{split}-{k:05d}-of-{num_shards:05d}.parquet"))
    (out / "README.md").write_text(_dataset_card(counts), encoding="utf-8")
    return out


def _dataset_card(counts: Dict[str, int]) -> str:
    return f"""---
license: mit
pretty_name: Fashion-MNIST ({counts['train']} train / {counts['test']} test)
task_categories:
- unconditional-image-generation
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
---
# Fashion-MNIST

{counts['train']:,} training and {counts['test']:,} test images (the first ones of each official split), 28×28 grey,
10 classes, stored as PNG in parquet shards. Converted from the original IDX files (md5-checked) by
`ddpm_hf.data.write_fashion_mnist`.

Fashion-MNIST: Han Xiao, Kashif Rasul, Roland Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", arXiv:1708.07747, 2017. https://github.com/zalandoresearch/fashion-mnist

The MIT License (MIT). Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""
