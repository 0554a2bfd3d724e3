"""FID/KID on the shipped Fashion-MNIST features, and the ddpm-hf command line run as a user would."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_hf.cli import main as cli
from ddpm_hf.evaluation import load_eval_images
from ddpm_hf.metrics import FMNIST_SHA256, FMNIST_WEIGHTS, extract_features, feature_extractor, fid_kid
from helpers import tiny_pipeline


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


def test_features_refuse_float_images():
    with pytest.raises(ValueError, match="uint8"):
        extract_features(feature_extractor("fmnist"), torch.rand(2, 1, 28, 28))


def test_cli_sample_and_evaluate(tmp_path):
    pipe = tiny_pipeline(num_train_timesteps=20, variance_type="fixed_large")
    pipe.save_pretrained(tmp_path / "pipe")
    assert cli(["sample", str(tmp_path / "pipe"), "--num_images", "5", "--batch_size", "2", "--out",
                str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("0*.png"))) == 5 and (tmp_path / "samples" / "grid.png").is_file()

    out = tmp_path / "eval"
    assert cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "bpd,rd,fid,kid,progressive,interpolation",
                "--num_bpd_images", "8", "--num_samples", "16", "--num_reference", "64", "--batch_size", "8",
                "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["bpd"]["exact"] and results["bpd"]["bits_per_dim"] > 0
    assert abs(results["bpd"]["rate_bpd"] + results["bpd"]["decoder_L0_bpd"] - results["bpd"]["bits_per_dim"]) < 1e-6
    quality = results["sample_quality"]
    assert quality["label"] == "FID-FMNIST" and quality["num_samples"] == 16 and quality["fid"] > 0
    for figure in ("rate_distortion.png", "samples.png", "progressive.png", "interpolation.png"):
        assert (out / figure).is_file(), figure


def test_evaluate_reports_bits_per_dim_of_the_test_images_under_the_seeded_noise(tmp_path):
    """results.json holds exactly what bits_per_dim gives on the test split's images with a generator seeded --seed,
    for the exact bound and a sampled one: reading other images, another split, or drawing other t or ε would change
    the numbers (the check below shows that other noise does)."""
    from datasets import Dataset, Features, Image as ImageFeature
    from PIL import Image

    from ddpm_hf import DDPMPipeline
    from ddpm_hf.likelihood import bits_per_dim
    from runs import png_bytes

    data = tmp_path / "data"
    data.mkdir()
    pngs = [png_bytes(seed, size=16) for seed in range(6)]  # the model's 16 × 16: no resizing, the pixels as stored
    Dataset.from_dict({"image": [{"bytes": png, "path": None} for png in pngs]},
                      features=Features({"image": ImageFeature()})).to_parquet(str(data / "test-00000-of-00001.parquet"))
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
                                generator=torch.Generator().manual_seed(seed))
        assert reported["bits_per_dim"] == expected.mean and reported["stderr"] == expected.stderr
        assert reported["prior_bpd"] == float(expected.prior.mean())
        assert reported["exact"] is expected.exact is (bpd_timesteps == 0)
        assert reported["num_images"] == 6 and reported["split"] == "test"
        if expected.exact:
            assert reported["decoder_L0_bpd"] == float(expected.terms[0])
            assert reported["rate_bpd"] == float(expected.mean - expected.terms[0])
        other_noise = bits_per_dim(pipe.unet, pipe.scheduler, images, num_timesteps=bpd_timesteps or None,
                                   batch_size=4, generator=torch.Generator().manual_seed(seed + 1))
        assert abs(other_noise.mean - expected.mean) > 1e-6  # so the equality above pins the noise too


def test_cli_rejects_bad_arguments_before_any_work(tmp_path, capsys):
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
    result = subprocess.run([sys.executable, "-m", "ddpm_hf.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "ddpm-hf" in result.stdout
