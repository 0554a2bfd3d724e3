"""FID/KID on the shipped Fashion-MNIST features, and the ddpm-hf command line run as a user would."""

import json
import subprocess
import sys

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
