"""Opening a dataset: a Hub repo (parquet, WebDataset tar or image files, at one commit), a local folder or file, or
the embedded subset, as a 🤗 datasets (iterable) dataset of image cells; what is refused before training (a missing
split, an unreadable shard, images that datasets would drop), and the patches to datasets' own behaviour."""

import itertools
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple


from ..errors import first_line, local_path_hint
from ..processes import usable_cores
from .embedded import EMBEDDED_DIR, EMBEDDED_NAME
from .shards import examples_iterables, in_threads, open_footer, remember_row_groups, row_groups_of


def load_image_dataset(dataset_name: Optional[str] = None, dataset_config_name: Optional[str] = None,
                       train_data_dir: Optional[str] = None, split: str = "train", streaming: bool = True,
                       cache_dir: Optional[str] = None, token: Optional[str] = None, check_shards: bool = True,
                       revision: Optional[str] = None):
    """A 🤗 IterableDataset of ``split`` from a Hub dataset id (``token`` for a private one, ``revision`` a branch, tag
    or commit, default main; see :func:`.shards.dataset_revision`), a local folder
    (``dataset_name`` or ``train_data_dir``: its ``split``'s parquet / arrow files, by datasets' own split rules (see
    :func:`folder_splits`), or image files as an imagefolder, or WebDataset tar files), or
    ``embedded:fashion_mnist``. ``check_shards``: read the footer of every parquet shard (a local tar: its headers)
    first (training checks on one process per machine: a local folder may be a copy of its own on each)."""
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("pass exactly one of --dataset_name or --train_data_dir.")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir} is not a folder.")
        ds = _load_local_folder(train_data_dir, split, streaming, cache_dir, check_shards, dataset_config_name)
    else:
        path = str(EMBEDDED_DIR) if dataset_name == EMBEDDED_NAME else dataset_name
        if os.path.isdir(path):
            ds = _load_local_folder(path, split, streaming, cache_dir, check_shards, dataset_config_name)
        elif os.path.exists(path) or not _looks_like_hub_dataset(dataset_name):
            raise FileNotFoundError(f"{dataset_name}: neither a folder nor a Hub dataset id "
                                    "('name' or 'namespace/name'); pass a folder of parquet/arrow/tar files, a Hub "
                                    f"dataset or {EMBEDDED_NAME}.")
        else:
            try:
                ds = _load_hub_dataset(dataset_name, dataset_config_name, split, streaming, cache_dir, token,
                                       check_shards, revision)
            except OSError as err:  # (a missing repo, the Hub unreachable): said with what is here
                raise OSError(f"{err}{local_path_hint(dataset_name)}") from err
    if not streaming:
        ds = ds.to_iterable_dataset(num_shards=min(len(ds), 64))
    return ds


def without_exit_pause(dataset):
    """``dataset`` (a 🤗 IterableDataset, changed in place) without datasets' pause at the end of each pass.

    datasets sleeps ``config.SLEEP_TIME_ON_THREADS_SHUTDOWN`` (5 s) whenever a pass over shuffled (shard-interleaved)
    parquet shards ends or is closed, so that pyarrow's scanner threads are gone before the interpreter could exit:
    pyarrow before 25 aborts the process at exit when a parquet scan was left part-way (apache/arrow#45214; measured
    here: 24.0.0 aborts every time, 25.0.0 never). A pass that ends has read every shard to its end and leaves no
    scan part-way under any pyarrow; with pyarrow >= 25 (setup.py's requirement) neither does one closed part-way.
    A training stream ends a pass at every epoch (on a GPU that was 5 s without a batch per epoch, bench/gpu.sh,
    2026-11-27) and closes one part-way when the run ends (an older pyarrow is refused at import: MINIMUM_VERSIONS).
    Set on the dataset's leaf iterables, the setting carries over to what shuffle, shard, split and set_epoch derive
    from them."""
    for node in examples_iterables(dataset):
        if hasattr(node, "_sleep_on_threads_shutdown"):
            node._sleep_on_threads_shutdown = False
    return dataset


def _load_hub_dataset(repo_id: str, config_name: Optional[str], split: str, streaming: bool,
                      cache_dir: Optional[str], token: Optional[str], check_shards: bool,
                      revision: Optional[str] = None):
    """A Hub dataset's ``split``, its repo, config, split and data files checked first (one-line errors naming the
    repo, the file and the fix): a missing or unreadable repo, an unknown config or split, a parquet shard that is
    truncated or not parquet (its footer is read, a few KB per shard, before any training), a tar that is not one, is
    cut short, or holds its first sample's image under a field that is not among the columns (the headers of its
    first sample and its end are read)."""
    from datasets import load_dataset_builder
    from datasets.exceptions import DatasetNotFoundError

    where = f"Hub dataset {repo_id}"
    try:
        builder = load_dataset_builder(repo_id, config_name, cache_dir=cache_dir, token=token, revision=revision)
    except DatasetNotFoundError as err:
        at, flags = (f" at revision {revision}", "--dataset_name and --dataset_revision") if revision else ("",
                                                                                                      "--dataset_name")
        if "is a gated dataset" in str(err):  # datasets tells a gated repo apart: its conditions are to be accepted
            raise FileNotFoundError(f"{where} is gated: {first_line(err)} Accept its conditions there with the "
                                    "account of the token you pass (--hub_token or HF_TOKEN).") from err
        raise FileNotFoundError(
            f"{where}{at} does not exist or this token cannot read it: check {flags}, and for a private or gated "
            "dataset pass --hub_token (or set HF_TOKEN) with read access.") from err
    except RuntimeError as err:
        if "scripts are no longer supported" not in str(err):
            raise
        raise ValueError(f"{where} is read by a loading script, which datasets no longer runs ({first_line(err)}). "
                         "The Hub's Parquet export of it loads: pass --dataset_revision refs/convert/parquet.") from err
    except ValueError as err:  # an unknown or missing config: datasets lists the available ones (on a later line)
        said, configs = first_line(err), re.search(r"\[[^\]]*\]", str(err))
        listed = f" Its configs: {configs.group(0)}." if configs and configs.group(0) not in said else ""
        raise ValueError(f"{where}: {said}{listed} Pass one of them with --dataset_config_name.") from err
    data_files = builder.config.data_files or {}
    if data_files and split not in data_files:
        raise ValueError(f"{where} (config {builder.config.name!r}) has no split {split!r}; its splits: "
                         f"{sorted(str(name) for name in data_files)}. Pass one of them with --split.")
    first_samples = {}
    if check_shards and builder.name in ("parquet", "arrow", "webdataset"):
        first_samples = _check_remote_shards(list(data_files.get(split, [])), builder.name, where, token)
    # (datasets chooses a WebDataset's columns as it opens the stream: they are checked before any download)
    streamed = builder.as_streaming_dataset(split=split) if streaming or first_samples else None
    if first_samples:
        _refuse_lost_images(streamed, first_samples, where)
    if streaming:
        return streamed
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


def _check_remote_shards(urls: List[str], builder: str, where: str, token: Optional[str]) -> Dict[frozenset, str]:
    """Read the footer of each ``hf://`` parquet shard (arrow: its schema; a tar: the headers of its first sample and
    its last two blocks, which end every whole tar with zeros), a few threads at a time. Returns, for tars, the image
    fields that the tars' first samples hold, each with the tars that hold it (\"the first samples of 2 tars
    (train-00002.tar, ...)\")."""

    def check(url: str) -> Optional[frozenset]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = None
        try:
            with open_footer(url, token) as remote:
                if builder == "parquet":
                    remember_row_groups({url: row_groups_of(pq.read_metadata(remote))})
                elif builder == "webdataset":
                    first = remote.read(tarfile.BLOCKSIZE)
                    # A compressed one (datasets reads it) is not checked: its headers lie in the compressed stream,
                    # its first sample read through in 16 KB requests, and its end is not the tar's own.
                    if not _compressed_tar(first):
                        if first != bytes(tarfile.BLOCKSIZE):  # (zeros: an empty tar)
                            remote.seek(0)
                            with tarfile.open(fileobj=remote, mode="r:") as tar:  # headers; contents seeked over
                                fields = next(image_fields_by_sample(tar, f"{where}: {_repo_path(url)}"), None)
                        size = remote.seek(0, os.SEEK_END)
                        remote.seek(max(size - 2 * tarfile.BLOCKSIZE, 0))
                        if remote.read() != bytes(2 * tarfile.BLOCKSIZE):
                            raise tarfile.ReadError("it does not end with a tar's end of archive (two zero blocks)")
                else:
                    pa.ipc.open_stream(remote).schema
        except (pa.ArrowException, tarfile.TarError, OSError) as err:
            if isinstance(err, (pa.ArrowInvalid, tarfile.TarError)):  # the bytes arrived and are not parquet (tar)
                raise ValueError(f"{where}: {_repo_path(url)} is not a readable {builder} file ({first_line(err)}); "
                                 f"it is truncated or not {builder}: fix or remove it in the dataset repo.") from err
            raise ConnectionError(f"{where}: {_repo_path(url)} could not be read ({type(err).__name__}: "
                                  f"{first_line(err)}) after huggingface_hub's retries: check the network and the "
                                  "Hub's status, then start again.") from err
        return fields

    tars: Dict[frozenset, List[str]] = {}
    for url, fields in zip(urls, in_threads(check, urls)):
        if fields is not None:
            tars.setdefault(fields, []).append(_repo_path(url))
    return {fields: f"the first samples of {len(names)} tar{'s' * (len(names) > 1)} ({', '.join(names[:3])}"
                    f"{', ...' if len(names) > 3 else ''})" for fields, names in tars.items()}


def _repo_path(url: str) -> str:
    """A file's path in its repo, from its ``hf://datasets/{repo}@{revision}/{path}`` URL."""
    return url.split("@", 1)[-1].split("/", 1)[-1]


def hub_dataset_id(dataset_name: Optional[str]) -> Optional[str]:
    """``dataset_name`` when it names a Hub dataset (not a local folder, not the embedded data): what a model card's
    ``datasets`` metadata links to."""
    if dataset_name is None or dataset_name == EMBEDDED_NAME or os.path.exists(dataset_name):
        return None
    return dataset_name if _looks_like_hub_dataset(dataset_name) else None


def _looks_like_hub_dataset(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", part) and ".." not in part
                                        for part in parts)


def _check_readable(files: List[str], builder: str) -> Dict[frozenset, int]:
    """Read each file's footer/schema (a tar: its member headers) so that a truncated or foreign file is named before
    training starts, not discovered as an error deep inside a data worker. Returns, for tars, how many samples hold
    each set of image fields (``png``, ``seg.jpg``: a member's name after its sample's key), the members grouped
    into samples as datasets' WebDataset reader groups them (consecutive members sharing a key, hidden ones
    skipped). Tars are read by a process per core, a header per member (about 20 µs each here: 3 M samples of two
    members took 2 minutes on one core, 100 M would outlast --ddp_timeout); the first bad file in the list is named."""
    samples: Dict[frozenset, int] = Counter()  # sets of image fields: how many samples hold each
    workers = min(len(files), usable_cores()) if builder == "webdataset" else 1
    if workers <= 1:
        for path in files:
            samples.update(_check_file(path, builder))
        return samples
    from tqdm.auto import tqdm

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for found in tqdm(pool.map(_check_file, files, itertools.repeat(builder)), total=len(files),
                          desc="checking the tar shards", unit="tar", disable=len(files) < 16):
            samples.update(found)
    return samples


def _check_file(path: str, builder: str) -> Dict[frozenset, int]:
    """One file of :func:`_check_readable`: its sets of image fields (tars) or nothing; a ValueError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples: Dict[frozenset, int] = Counter()
    try:
        if builder == "parquet":
            pq.read_metadata(path)
        elif builder == "webdataset":
            with open(path, "rb") as raw:
                compressed = _compressed_tar(raw.read(10))
            if compressed:  # read whole, as datasets reads it: its headers lie in the compressed stream
                with tarfile.open(path, "r|*") as tar:
                    samples.update(image_fields_by_sample(tar, path))
                return samples
            size = os.path.getsize(path)
            with tarfile.open(path, "r:") as tar:  # one 512-byte header per member, the contents skipped
                last = None

                def members():  # each checked for its size (a sparse one's is that of its holes filled)
                    nonlocal last
                    for last in tar:
                        if not last.issparse() and last.offset_data + last.size > size:
                            raise OSError(f"its member {last.name} ends at byte {last.offset_data + last.size} "
                                          f"of a file of {size}")
                        yield last

                samples.update(image_fields_by_sample(members(), path))
                with open(path, "rb") as raw:  # tarfile stops quietly at a corrupt header: the end must be zeros
                    raw.seek(tar.offset)
                    end = raw.read(2 * tarfile.BLOCKSIZE)
                if end != bytes(2 * tarfile.BLOCKSIZE):
                    raise OSError(f"the member after {'member ' + last.name if last else 'its start'} (byte "
                                  f"{tar.offset}) has a corrupt header, or the end of archive is missing")
        else:
            with pa.memory_map(path) as source:
                try:
                    pa.ipc.open_stream(source).schema
                except pa.ArrowInvalid:
                    source.seek(0)
                    pa.ipc.open_file(source).schema
    except (pa.ArrowException, tarfile.TarError, OSError) as err:
        raise ValueError(f"{path} is not a readable {builder} file ({err}); it is truncated or corrupt: "
                         "rewrite or remove it.") from err
    return samples


def _compressed_tar(head: bytes) -> bool:
    """Whether a .tar file whose first bytes are ``head`` (10 or more) is compressed (gzip, bzip2, xz), as tarfile's
    "r|*", with which datasets reads every tar, tells: datasets reads such a file all the same."""
    return head.startswith((b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ")) or (
        head[:3] == b"BZh" and head[4:10] == b"1AY&SY")


def image_fields_by_sample(members: Iterable[tarfile.TarInfo], where: str) -> Iterator[frozenset]:
    """The image fields (``png``, ``seg.jpg``: a member's name after its sample's key) of each sample of the tar
    ``where`` whose ``members`` are given in order, grouped into samples as datasets' WebDataset reader groups them:
    consecutive members sharing a key, hidden ones skipped. A sample holding a field twice is refused: datasets
    stops reading there."""
    from datasets.packaged_modules.webdataset.webdataset import WebDataset, base_plus_ext

    def keyed():
        for member in members:
            if member.isreg() and not os.path.basename(member.name).startswith((".", "__")):
                key, field = base_plus_ext(member.name)
                if key is not None:
                    yield key, field

    for key, sample in itertools.groupby(keyed(), key=lambda member: member[0]):
        fields = [field for _, field in sample]
        twice = next((field for k, field in enumerate(fields) if field in fields[:k]), None)
        if twice is not None:
            raise ValueError(f"{where}: its sample {key!r} holds two members {key}.{twice}, and datasets stops reading "
                             "the tar there (\"Duplicate field\"): write each file of a sample once, or give the "
                             "samples keys of their own.")
        yield frozenset(field for field in fields if field.rsplit(".", 1)[-1].lower() in WebDataset.IMAGE_EXTENSIONS)


def _refuse_lost_images(dataset, held: Dict[frozenset, str], where: str) -> None:
    """datasets takes a WebDataset's columns from its first samples: samples whose only images are under fields that
    are not among ``dataset``'s image columns would have no image, and be skipped one by one all through training.
    ``held``: sets of image fields, each with the samples found holding it (\"12 samples\"), refused here if lost."""
    from datasets import Image as ImageFeature

    columns = {name for name, feature in (dataset.features or {}).items() if isinstance(feature, ImageFeature)}
    lost = [f"{what} hold their image only as {' and '.join(sorted('.' + f for f in fields))}"
            for fields, what in held.items() if fields and not fields & columns]
    if lost:
        raise ValueError(
            f"{where}: " + ", ".join(lost) + ", but datasets takes a WebDataset's columns from its first samples, "
            f"which give {', '.join(sorted('.' + c for c in columns)) or 'no image'}: those images would be skipped. "
            "Write every sample's image under one extension.")


def image_extensions() -> Tuple[str, ...]:
    """The image files an image folder is made of: those of datasets' imagefolder (Pillow's formats)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return tuple(ImageFolder.EXTENSIONS)


# an image folder's metadata (datasets' imagefolder reads them beside the images), never a parquet dataset's data
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def folder_splits(folder: str, config_name: Optional[str] = None,
                  cache_dir: Optional[str] = None) -> Dict[str, List[str]]:
    """datasets' own reading of a local folder: each split's files as ``load_dataset(folder, config_name)`` gives them
    (the configs of its README.md's metadata, as a local copy of a Hub dataset has them; else the split names in its
    file or folder names: train, test, validation and their synonyms, and a folder that names none is all train).
    So train.parquet and test.parquet are two splits, not one, and a split the folder does not name has no files.
    {} for a folder without a file datasets reads."""
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(folder, config_name, cache_dir=cache_dir)
    except FileNotFoundError:  # (datasets' EmptyDatasetError among them)
        return {}
    except ValueError as err:  # an unknown or missing config: datasets lists them
        raise ValueError(f"{folder}: {first_line(err)}" + (" Pass one of its configs with --dataset_config_name."
                                                           if "config" in str(err).lower() else "")) from err
    except RuntimeError as err:  # a loading script beside the data, which datasets no longer runs
        raise ValueError(f"{folder}: {first_line(err)}; remove the script, or pass the folder of the data "
                         "files.") from err
    return {str(split): [str(path) for path in files] for split, files in (builder.config.data_files or {}).items()}


def _of_kind(files: List[str], extensions: Tuple[str, ...]) -> List[str]:
    """The ``files`` of ``extensions`` (".parquet", ...; any case), an image folder's metadata files left out."""
    return sorted(path for path in files if path.lower().endswith(extensions)
                  and os.path.basename(path) not in METADATA_FILES)


def _splits_said(folder: str, splits: Dict[str, List[str]], split: str) -> str:
    """How datasets reads ``folder``'s splits, for a ``split`` it finds nothing of: the splits and a few of their
    files, and what to do."""
    said = "; ".join(f"{name}: {', '.join(os.path.relpath(path, folder) for path in files[:2])}"
                     f"{', ...' if len(files) > 2 else ''}" for name, files in sorted(splits.items()))
    return (f"datasets reads this folder's splits from its README's configs or from split names in its file and "
            f"folder names (a folder that names none is all train), and finds {said or 'none'}. Rename the files "
            f"that name splits, put the {split} files in a {split}/ folder or name them {split}-00000.parquet, ..., "
            "or pass --split")


def _load_local_folder(folder: str, split: str, streaming: bool, cache_dir: Optional[str], check: bool = True,
                       config_name: Optional[str] = None):
    """A local folder, whichever flag named it: its ``split``'s files as datasets reads them (see
    :func:`folder_splits`; a folder of several kinds is read as the kind most of its files are, as datasets does):
    its parquet / arrow files if it has any, else its image files (imagefolder, with their metadata if present), else
    its WebDataset tar shards; a folder with none of these is refused with what it does hold. ``check``: read the
    files' footers or headers first (see _check_readable)."""
    from datasets import load_dataset

    splits = folder_splits(folder, config_name, cache_dir)  # (the folder listed once, as datasets lists it)
    in_split = splits.get(split, [])
    if not in_split and folder == str(EMBEDDED_DIR):  # the package's own files: none to rename or move
        raise FileNotFoundError(f"{EMBEDDED_NAME} has no split {split!r}; its splits: {sorted(splits)}. Pass one of "
                                "them with --split.")
    for builder in ("parquet", "arrow"):
        files = _of_kind(in_split, (f".{builder}",))
        if files:
            if check:
                _check_readable(files, builder)
            return load_dataset(builder, data_files={split: files}, split=split, streaming=streaming,
                                cache_dir=cache_dir)
    split_images = _of_kind(in_split, image_extensions())
    if split_images:
        metadata = [path for path in in_split if os.path.basename(path) in METADATA_FILES]
        return load_dataset("imagefolder", data_files={split: split_images + metadata}, split=split,
                            streaming=streaming, cache_dir=cache_dir)
    files = _of_kind(in_split, (".tar",))
    if files:
        samples = _check_readable(files, "webdataset") if check else {}
        dataset = load_dataset("webdataset", data_files={split: files}, split=split, streaming=streaming,
                               cache_dir=cache_dir)
        _refuse_lost_images(dataset, {fields: f"{n} samples" for fields, n in samples.items()}, folder)
        return dataset
    found = [Path(root, name) for root, _, names in os.walk(folder) for name in names]
    images = [path for path in found if path.suffix.lower() in image_extensions()]
    if images:  # datasets' imagefolder would read no rows
        raise FileNotFoundError(f"{folder}: none of its {len(images)} image files is in split {split!r}: "
                                f"{_splits_said(folder, splits, split)}.")
    extensions = sorted({path.suffix.lower() or "(none)" for path in found})
    data_files = [path for path in found if path.suffix in (".parquet", ".arrow", ".tar")]
    what = (f"{len(found)} files ({', '.join(extensions)})" if found else "nothing")
    hint = f"; {_splits_said(folder, splits, split)}" if data_files else ""
    if any(path.name.lower().endswith((".tar.gz", ".tgz")) for path in found):
        hint += ("; compressed tars (.tar.gz, .tgz) are not read as WebDataset shards (datasets reads plain .tar): "
                 "decompress them with gunzip, or pass the images as parquet")
    raise FileNotFoundError(f"{folder} holds no {split} parquet/arrow/tar files and no image files "
                            f"(.png, .jpg, .webp, ... as datasets' imagefolder reads): found {what}{hint}. A dataset "
                            "folder holds parquet/arrow files, WebDataset tar shards or image files.")


def holds_encoded_images(feature) -> bool:
    """Whether a column of ``feature`` can be read as encoded images (datasets casts it to ``Image``): an Image, a
    {bytes, path} struct, file paths or bytes."""
    from datasets import Image as ImageFeature, Value

    if isinstance(feature, ImageFeature):
        return True
    if isinstance(feature, Value):
        return feature.dtype in ("string", "large_string", "binary", "large_binary")
    return isinstance(feature, dict) and set(feature) <= {"bytes", "path"} and bool(feature)


def find_image_column(features, image_column: Optional[str] = None) -> str:
    """The named image column, or the only/first column whose feature is an Image; fails listing the columns."""
    from datasets import Image as ImageFeature

    columns = list(features) if features is not None else []
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"--image_column {image_column!r} is not a column of the dataset; its columns: {columns}.")
        if not holds_encoded_images(features[image_column]):
            raise ValueError(f"--image_column {image_column!r} holds {features[image_column]!r}, not encoded images "
                             "(an Image feature, {bytes, path} structs, file paths or bytes): arrays of pixels are not "
                             "read; write the images as PNG or JPEG (datasets' Image feature encodes arrays so).")
        return image_column
    candidates = [name for name, feature in (features or {}).items() if isinstance(feature, ImageFeature)]
    if not candidates:
        raise ValueError(f"the dataset has no image column (columns: {columns}); name it with --image_column.")
    return candidates[0]
