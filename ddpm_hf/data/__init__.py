"""Training data through 🤗 datasets: any Hub dataset, local parquet / arrow / WebDataset tar / imagefolder, or the
Fashion-MNIST subset embedded in this package, streamed or not, split across ranks by shards, shuffled per epoch,
resumable exactly.

Global batches do not depend on the number of processes: the stream is split into ``num_streams`` disjoint streams
(by default one per process); each process serves the streams ``v`` with ``v % world_size == rank``, and each stream
contributes ``per_stream_batch`` examples to every step (the training loop draws each stream's diffusion noise from
that stream's own generator). A run with 2 processes and a run with 1 process and ``num_streams=2`` therefore train on
the same global batches, and so do runs with any number of decoding workers.

The way of a row, one module a stage:
- ``sources``: a dataset opened (Hub repo at one commit, local folder, ``embedded``), checked before training;
- ``shards``: its files as a resume needs them (the commit, parquet row groups, tar sample counts);
- ``stream``: ``TrainStream``, the shuffled streams, their positions kept in checkpoints and replayed on resume;
- ``reader``: the process and workers that assemble the batches off the training process;
- ``decoding``: a row's image read, decoded, resized and flipped, as a worker does it;
- ``embedded``: the Fashion-MNIST subset shipped in this package, and the writer of its shards.

The names below are the package's interface; the others are imported from their module.
"""

from .decoding import check_channels, first_images, image_channels, prepare_image
from .embedded import EMBEDDED_DIR, EMBEDDED_NAME, write_fashion_mnist
from .reader import all_processes, default_num_workers
from .shards import dataset_revision, known_row_groups, remember_row_groups, row_fingerprint
from .sources import find_image_column, hub_dataset_id, load_image_dataset
from .stream import TrainStream

__all__ = ["EMBEDDED_DIR", "EMBEDDED_NAME", "TrainStream", "all_processes", "check_channels", "dataset_revision",
           "default_num_workers", "find_image_column", "first_images", "hub_dataset_id", "image_channels",
           "known_row_groups", "load_image_dataset", "prepare_image", "remember_row_groups", "row_fingerprint",
           "write_fashion_mnist"]
