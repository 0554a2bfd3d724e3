"""The ``ddpm-hf`` command line: sample, evaluate, and prepare data.

    ddpm-hf sample PIPELINE --num_images 64 --out samples/
    ddpm-hf evaluate PIPELINE --data embedded:fashion_mnist --metrics bpd,fid,kid,rd --num_samples 1000 --out eval/
    accelerate launch -m ddpm_hf.cli evaluate ...     # samples generated on every process
    ddpm-hf data fashion-mnist --out data/fmnist       # full 60k/10k from Debian's dataset-fashion-mnist

PIPELINE is a pipeline folder or a Hub repo id. Results go to --out as JSON and PNG files.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

METRICS = ("bpd", "fid", "kid", "rd", "progressive", "interpolation")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return number


def _metrics(value: str) -> List[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown metrics {unknown or value!r}; choose from {','.join(METRICS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ddpm-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ddpm-hf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sample = sub.add_parser("sample", help="generate images with a pipeline")
    sample.add_argument("pipeline", help="pipeline folder or Hub repo id")
    sample.add_argument("--num_images", type=_positive, default=16)
    sample.add_argument("--out", required=True)
    sample.add_argument("--batch_size", type=_positive, default=64)
    sample.add_argument("--num_inference_steps", type=_positive, default=None, help="default: the full chain")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default=None)

    evaluate = sub.add_parser("evaluate", help="bits/dim, FID/KID, rate-distortion and the paper's figures")
    evaluate.add_argument("pipeline", help="pipeline folder or Hub repo id")
    evaluate.add_argument("--data", default="embedded:fashion_mnist", help="dataset name or local folder")
    evaluate.add_argument("--data_config", default=None)
    evaluate.add_argument("--split", default="test", help="split for bits/dim")
    evaluate.add_argument("--reference_split", default="train", help="split for the FID/KID reference statistics")
    evaluate.add_argument("--metrics", type=_metrics, default=["bpd", "fid", "kid"])
    evaluate.add_argument("--num_samples", type=_positive, default=1000, help="generated images for FID/KID")
    evaluate.add_argument("--num_reference", type=_positive, default=5000, help="real images for FID/KID")
    evaluate.add_argument("--num_bpd_images", type=_positive, default=64)
    evaluate.add_argument("--bpd_timesteps", type=_non_negative, default=0, help="0: exact bound (all T terms); K: sampled")
    evaluate.add_argument("--features", default="fmnist", choices=["fmnist", "inception"])
    evaluate.add_argument("--num_inference_steps", type=_positive, default=None, help="default: the full chain")
    evaluate.add_argument("--batch_size", type=_positive, default=64)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", required=True)
    evaluate.add_argument("--device", default=None)

    data = sub.add_parser("data", help="write a dataset as parquet shards")
    data.add_argument("name", choices=["fashion-mnist"])
    data.add_argument("--out", required=True)
    data.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    data.add_argument("--train_limit", type=_positive, default=None)
    data.add_argument("--test_limit", type=_positive, default=None)
    data.add_argument("--num_shards", type=_positive, default=16)
    return parser


def _load(pipeline: str, device: Optional[str]):
    from .pipelines import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(pipeline)
    if device:
        pipe.to(device)
    return pipe


def _num_steps(pipe, requested: Optional[int]) -> int:
    total = pipe.scheduler.config.num_train_timesteps
    if requested is not None and requested > total:
        raise SystemExit(f"--num_inference_steps {requested} exceeds the model's {total} diffusion steps.")
    return requested or total


def generate_uint8(pipe, num_images: int, batch_size: int, steps: int, seed: int, desc: str = "sampling",
                   process_index: int = 0, num_processes: int = 1) -> torch.Tensor:
    """uint8 (N, C, H, W) samples; image i uses its own generator seeded seed + i, so the set does not depend on
    the batch size or on how many processes share the work (process p makes images p, p + P, ...)."""
    from tqdm.auto import tqdm

    mine = list(range(process_index, num_images, num_processes))
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, unit="batch", disable=process_index != 0):
        ids = mine[start:start + batch_size]
        out = pipe(batch_size=len(ids), generator=[torch.Generator().manual_seed(seed + i) for i in ids],
                   num_inference_steps=steps, output_type="pt").images
        chunks.append((out * 255).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)


def _grid(images: torch.Tensor):
    from PIL import Image

    from .pipelines import image_grid

    return image_grid([Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
                       for a in images.permute(0, 2, 3, 1).numpy()])


def cmd_sample(args) -> int:
    pipe = _load(args.pipeline, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = generate_uint8(pipe, args.num_images, args.batch_size, _num_steps(pipe, args.num_inference_steps),
                            args.seed)
    from PIL import Image

    for i, array in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(out / f"{i:05d}.png")
    _grid(images[:64]).save(out / "grid.png")
    print(f"{len(images)} images in {out}, grid: {out / 'grid.png'}")
    return 0


def cmd_evaluate(args) -> int:
    import os

    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    from .evaluation import load_eval_images
    from .likelihood import bits_per_dim, plot_rate_distortion

    if "rd" in args.metrics and args.bpd_timesteps:
        raise SystemExit("the rate-distortion curve (rd) needs the exact bound: use --bpd_timesteps 0.")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:
        raise SystemExit(f"{launched} processes were launched but accelerate set up {state.num_processes}: each would "
                         "sample everything. On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`.")
    pipe = _load(args.pipeline, args.device or str(state.device))
    if args.bpd_timesteps >= pipe.scheduler.config.num_train_timesteps:
        raise ValueError(f"--bpd_timesteps {args.bpd_timesteps} is not fewer than the model's "
                         f"{pipe.scheduler.config.num_train_timesteps} diffusion steps: use 0 for the exact bound.")
    unet = pipe.unet
    channels, size = unet.config.in_channels, unet.config.sample_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = _num_steps(pipe, args.num_inference_steps)
    results = {"pipeline": args.pipeline, "data": args.data, "num_inference_steps": steps,
               "num_processes": state.num_processes}
    started = time.time()

    if {"bpd", "rd"} & set(args.metrics) and state.is_main_process:
        images = load_eval_images(args.data, args.num_bpd_images, size, channels, split=args.split,
                                  dataset_config_name=args.data_config)
        bound = bits_per_dim(unet, pipe.scheduler, images, num_timesteps=args.bpd_timesteps or None,
                             batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed))
        results["bpd"] = {"bits_per_dim": bound.mean, "stderr": bound.stderr, "exact": bound.exact,
                          "num_images": len(images), "split": args.split, "prior_bpd": float(bound.prior.mean())}
        if bound.exact:
            results["bpd"]["decoder_L0_bpd"] = float(bound.terms[0])
            results["bpd"]["rate_bpd"] = float(bound.mean - bound.terms[0])
        if "rd" in args.metrics:
            curve = bound.rate_distortion()
            (out / "rate_distortion.json").write_text(json.dumps(curve))
            plot_rate_distortion(bound, out / "rate_distortion.png", title=f"{args.pipeline} on {args.data}")
            results["rate_distortion"] = {"final_rate_bpd": curve["rate_bpd"][-1],
                                          "final_rmse": curve["distortion_rmse"][-1], "plot": "rate_distortion.png"}

    if {"fid", "kid"} & set(args.metrics):
        from .metrics import cached_features, extract_features, feature_extractor, fid_kid

        extractor = feature_extractor(args.features)  # fails now, before any sampling, if unavailable
        mine = generate_uint8(pipe, args.num_samples, args.batch_size, steps, args.seed + 10**6, "sampling for FID",
                              state.process_index, state.num_processes)
        samples = torch.cat(gather_object([mine]))
        if state.is_main_process:
            key = f"{args.features}|{args.data}|{args.data_config}|{args.reference_split}|{args.num_reference}|{size}|{channels}"
            real = cached_features(key, lambda: extract_features(extractor, load_eval_images(
                args.data, args.num_reference, size, channels, split=args.reference_split,
                dataset_config_name=args.data_config)))
            scores = fid_kid(real, extract_features(extractor, samples))
            label = "FID-FMNIST" if args.features == "fmnist" else "FID"
            results["sample_quality"] = {"features": args.features, "label": label, "num_samples": len(samples),
                                         "num_reference": len(real), "reference_split": args.reference_split,
                                         **{k: v for k, v in scores.items() if k[:3] in args.metrics}}
            _grid(samples[:64]).save(out / "samples.png")

    if state.is_main_process and "progressive" in args.metrics:
        pipe.progressive(batch_size=4, generator=torch.Generator().manual_seed(args.seed), num_inference_steps=steps,
                         num_snapshots=10).grid.save(out / "progressive.png")
    if state.is_main_process and "interpolation" in args.metrics:
        pair = load_eval_images(args.data, 2, size, channels, split=args.split, dataset_config_name=args.data_config)
        to_model = lambda x: x.float() / 127.5 - 1  # noqa: E731
        t = pipe.scheduler.config.num_train_timesteps // 2
        pipe.interpolate(to_model(pair[0]), to_model(pair[1]), lambdas=8, t=t, seed=args.seed).grid.save(
            out / "interpolation.png")
    if state.is_main_process:
        results["seconds"] = round(time.time() - started, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        print(f"results: {out / 'results.json'}; figures: {', '.join(sorted(p.name for p in out.glob('*.png')))}")
    return 0


def cmd_data(args) -> int:
    from .data import write_fashion_mnist

    path = write_fashion_mnist(args.out, args.source, args.train_limit, args.test_limit, args.num_shards)
    print(f"Fashion-MNIST written to {path} (use --dataset_name {path})")
    return 0


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Arguments every subcommand shares, checked before anything is loaded."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    device = getattr(args, "device", None)
    if device:
        try:
            kind = torch.device(device).type
        except RuntimeError as err:
            parser.error(f"--device {device!r}: {err}")
        if kind == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA device is available here (use cpu)")
        if kind == "mps" and not torch.backends.mps.is_available():
            parser.error(f"--device {device}: MPS is not available here (use cpu)")
    if args.command == "evaluate" and {"bpd", "rd", "fid", "kid", "interpolation"} & set(args.metrics):
        _check_data(parser, args)


def _check_data(parser: argparse.ArgumentParser, args) -> None:
    """Open the evaluation data and read one image: a wrong name or split fails now, not after an hour of sampling."""
    from .data import find_image_column, first_image, load_image_dataset

    splits = [args.split] if {"bpd", "rd", "interpolation"} & set(args.metrics) else []
    splits += [args.reference_split] if {"fid", "kid"} & set(args.metrics) else []
    for split in dict.fromkeys(splits):
        try:
            dataset = load_image_dataset(args.data, args.data_config, split=split, streaming=True)
            first_image(dataset, find_image_column(dataset.features))
        except (OSError, ValueError) as err:
            parser.error(f"--data {args.data} (split {split!r}): {err}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    check_args(parser, args)
    try:
        return {"sample": cmd_sample, "evaluate": cmd_evaluate, "data": cmd_data}[args.command](args)
    except (OSError, ValueError) as err:  # bad pipeline folder, repo, data or values: the message says which
        raise SystemExit(f"ddpm-hf {args.command}: error: {err}") from err


if __name__ == "__main__":
    sys.exit(main())
