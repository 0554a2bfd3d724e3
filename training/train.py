#!/usr/bin/env python
"""Train a DDPM (Ho, Jain & Abbeel 2020) with 🤗 Accelerate on any 🤗 datasets image dataset.

    accelerate launch training/train.py --preset small-28 --dataset_name embedded:fashion_mnist \\
        --max_train_steps 2000 --output_dir runs/fmnist
    # 2 CPU processes (real DDP over gloo):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train.py ...
    # the paper's CIFAR-10 recipe on 8 GPUs:
    accelerate launch --multi_gpu --num_processes 8 training/train.py --preset ddpm-cifar10 \\
        --dataset_name cifar10 --train_batch_size 16

Training is step-based (a stream has no length). Flags are named like diffusers' train_unconditional.py where the
meaning is the same; a preset supplies the network and the paper's hyper-parameters, and any flag overrides it.
Outputs in --output_dir: checkpoint-N/ (accelerate state, written atomically), samples/step-N.png, logs/
(tensorboard), run_info.json, and pipeline/ (the final EMA pipeline: a diffusers folder).
"""

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet, PRESETS
from ddpm_hf.data import (EMBEDDED_NAME, TrainStream, check_channels, find_image_column, first_image,
                          load_image_dataset)
from ddpm_hf.ema import EMA
from ddpm_hf.hub import is_repo_id, redact, unknown_config_keys
from ddpm_hf.losses import LOSSES, make_loss
from ddpm_hf.pipelines import image_grid
from ddpm_hf.presets import training_defaults, unet_config
from ddpm_hf.scheduler import BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES

logger = logging.getLogger("ddpm_hf.train")

# Used when neither the flag nor the preset sets a value.
FALLBACKS = dict(learning_rate=2e-4, lr_warmup_steps=5000, train_batch_size=16, max_grad_norm=1.0, ema_max_decay=0.9999,
                 random_flip=False, variance_type="fixed_large", max_train_steps=10_000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=None, help=f"Hub dataset, local folder of parquet/arrow files, or "
                      f"{EMBEDDED_NAME} (default when --train_data_dir is not given)")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="a folder of image files (imagefolder)")
    data.add_argument("--split", default="train")
    data.add_argument("--image_column", default=None, help="default: the first Image column")
    data.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True)
    data.add_argument("--shuffle_buffer_size", type=int, default=1000)
    data.add_argument("--resolution", type=int, default=None, help="default: the model's sample_size")
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True)
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None)
    data.add_argument("--cache_dir", default=None)
    data.add_argument("--data_streams", type=int, default=None,
                      help="split the data into this many streams (default: one per process); runs with the same "
                           "value train on the same global batches whatever the number of processes")

    model = p.add_argument_group("model and diffusion")
    model.add_argument("--preset", default="small-28", choices=sorted(PRESETS))
    model.add_argument("--model_config", default=None, help="a UNet2DModel-style config.json, overrides --preset")
    model.add_argument("--dropout", type=float, default=None)
    model.add_argument("--original_init", action="store_true", help="the original code's initialisation")
    model.add_argument("--ddpm_num_steps", type=int, default=1000)
    model.add_argument("--ddpm_beta_schedule", default="linear", choices=BETA_SCHEDULES)
    model.add_argument("--variance_type", default=None, choices=VARIANCE_TYPES)
    model.add_argument("--prediction_type", default="epsilon", choices=PREDICTION_TYPES)
    model.add_argument("--loss", default="simple", choices=LOSSES)
    model.add_argument("--ddpm_num_inference_steps", type=int, default=1000)

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max_train_steps", type=int, default=None)
    opt.add_argument("--max_train_minutes", type=float, default=None,
                     help="also stop after this much training time (all processes stop at the same step)")
    opt.add_argument("--train_batch_size", type=int, default=None, help="per process and per data stream")
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1)
    opt.add_argument("--learning_rate", type=float, default=None)
    opt.add_argument("--lr_scheduler", default="constant_with_warmup",
                     choices=["constant_with_warmup", "constant", "linear", "cosine"])
    opt.add_argument("--lr_warmup_steps", type=int, default=None)
    opt.add_argument("--adam_beta1", type=float, default=0.9)
    opt.add_argument("--adam_beta2", type=float, default=0.999)
    opt.add_argument("--adam_weight_decay", type=float, default=0.0)
    opt.add_argument("--adam_epsilon", type=float, default=1e-8)
    opt.add_argument("--max_grad_norm", type=float, default=None)
    opt.add_argument("--max_nonfinite_steps", type=int, default=5,
                     help="skip updates with a NaN/Inf loss or gradient; stop after this many in a row")
    opt.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    opt.add_argument("--ema_max_decay", type=float, default=None)
    opt.add_argument("--ema_warmup", action="store_true", help="ramp the EMA decay up (short runs)")
    opt.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    opt.add_argument("--gradient_checkpointing", action="store_true")
    opt.add_argument("--seed", type=int, default=0)

    out = p.add_argument_group("outputs")
    out.add_argument("--output_dir", default="ddpm-output")
    out.add_argument("--checkpointing_steps", type=int, default=500)
    out.add_argument("--checkpoints_total_limit", type=int, default=3)
    out.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    out.add_argument("--save_images_steps", type=int, default=0, help="0: only at the end")
    out.add_argument("--num_sample_images", type=int, default=16)
    out.add_argument("--eval_steps", type=int, default=0, help="bits/dim estimate every N steps (0: never)")
    out.add_argument("--logger", default="tensorboard", choices=["tensorboard", "wandb", "none"])
    out.add_argument("--logging_dir", default="logs")
    out.add_argument("--record_example_ids", action="store_true",
                     help="write the sha1 of every training image per process (audits of the data split)")
    hub = p.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", default=None)
    hub.add_argument("--hub_token", default=None)
    hub.add_argument("--hub_private_repo", action="store_true")
    hub.add_argument("--push_checkpoints", action="store_true", help="also push the EMA pipeline at checkpoints")
    hub.add_argument("--hub_push_attempts", type=int, default=3, help="tries per upload (backoff 2 s, 4 s, ...)")
    hub.add_argument("--hub_timeout", type=float, default=120.0, help="seconds without progress before an upload "
                     "request is abandoned (and retried)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Fill what the flags leave open from the preset, then check every flag's range and combination before anything
    is loaded: ``p.error`` names the flag and exits with status 2."""
    defaults = dict(FALLBACKS, **training_defaults(args.preset))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.dataset_name is None and args.train_data_dir is None:
        args.dataset_name = EMBEDDED_NAME
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "ddpm_num_steps",
                 "ddpm_num_inference_steps", "num_sample_images", "max_nonfinite_steps", "hub_push_attempts"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("checkpointing_steps", "checkpoints_total_limit", "save_images_steps", "eval_steps",
                 "lr_warmup_steps", "shuffle_buffer_size"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.data_streams is not None and args.data_streams < 1:
        p.error(f"--data_streams must be at least 1, got {args.data_streams}")
    for name in ("max_grad_norm", "adam_epsilon", "hub_timeout") + (("max_train_minutes",) if args.max_train_minutes
                                                                    is not None else ()):
        if not getattr(args, name) > 0:  # also refuses NaN
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0 < args.learning_rate < 1:
        p.error(f"--learning_rate must be in (0, 1), got {args.learning_rate}")
    for name in ("adam_beta1", "adam_beta2", "ema_max_decay", "dropout", "adam_weight_decay"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            p.error(f"--{name} must be in [0, 1), got {value}")
    if args.ddpm_num_inference_steps > args.ddpm_num_steps:
        p.error("--ddpm_num_inference_steps cannot exceed --ddpm_num_steps")
    if args.resolution is not None and args.resolution < 1:
        p.error(f"--resolution must be at least 1, got {args.resolution}")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id namespace/name")
    if args.hub_model_id is not None and not (is_repo_id(args.hub_model_id) and args.hub_model_id.count("/") == 1):
        p.error(f"--hub_model_id {args.hub_model_id!r} is not a Hub repo id: use namespace/name with letters, "
                "digits, '.', '_' or '-'")
    if args.variance_type in ("learned", "learned_range") and args.loss == "simple":
        p.error(f"--variance_type {args.variance_type} gets no gradient from --loss simple: use --loss hybrid or vlb")
    if args.push_checkpoints and not args.push_to_hub:
        p.error("--push_checkpoints needs --push_to_hub")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output_dir {args.output_dir} is a file, not a folder")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        p.error(f"--train_data_dir {args.train_data_dir} is not a folder")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        p.error(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder (or use 'latest')")
    if args.model_config:
        try:
            read_model_config(args.model_config)
        except ValueError as err:
            p.error(str(err))


def read_model_config(path: str) -> dict:
    """A UNet2DModel-style config.json as a dict, checked for unknown keys (a typo would silently fall back to the
    default) and missing files or bad JSON, each named."""
    if not os.path.isfile(path):
        raise ValueError(f"--model_config {path}: no such file")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--model_config {path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"--model_config {path} must hold a JSON object")
    unknown = unknown_config_keys(config, DDPMUNet)
    if unknown:
        raise ValueError(f"--model_config {path} has unknown keys {unknown}: not UNet2DModel config keys (see a "
                         "preset, e.g. ddpm_hf.unet_config('small-28'))")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_model(args) -> DDPMUNet:
    config = read_model_config(args.model_config) if args.model_config else unet_config(args.preset)
    if args.dropout is not None:
        config["dropout"] = args.dropout
    if args.variance_type in ("learned", "learned_range"):
        config["out_channels"] = 2 * config["in_channels"]
    try:
        model = DDPMUNet(**config)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{args.model_config or '--preset ' + args.preset}: invalid U-Net config: {err}") from err
    return model.initialize_like_ddpm(torch.Generator().manual_seed(args.seed)) if args.original_init else model


class Progress:
    """The optimizer step count, checkpointed with the rest of the state."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def checkpoints(output_dir: Path):
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# Folders are written under a hidden name and renamed into place, so a crash at any moment leaves every visible
# folder complete. Hidden leftovers: ".X.tmp" (half written), ".X.trash" (half deleted), ".X.old" (the previous X,
# moved aside for the instant of a swap).
def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, so that the rename that publishes it cannot outlive its contents."""
    for path in sorted(folder.rglob("*")) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_folder(tmp: Path, final: Path) -> None:
    """Make the complete folder ``tmp`` visible as ``final``, replacing any previous version."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def delete_folder(folder: Path) -> None:
    """Delete ``folder`` so that it is never seen half deleted."""
    trash = folder.with_name(f".{folder.name}.trash")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover_folders(output_dir: Path) -> None:
    """Finish what a crash interrupted: drop half-written and half-deleted folders, restore a swapped-out one."""
    for hidden in [*output_dir.glob(".checkpoint-*.*"), *output_dir.glob(".pipeline.*")]:
        name, _, kind = hidden.name[1:].rpartition(".")
        if kind == "old" and not (output_dir / name).exists():
            os.replace(hidden, output_dir / name)
        elif kind in ("tmp", "trash", "old"):
            shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int):
    """accelerate.save_state into a hidden folder, published when every process has written and the files are on
    disk: a kill or a full disk while saving leaves the previous checkpoint intact. A failed write stops the run with
    the reason; the half-written folder is removed."""
    tmp, final = output_dir / f".checkpoint-{step}.tmp", output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            fsync_tree(tmp)
    except Exception as err:  # ENOSPC, EFBIG, EDQUOT, EIO surface as OSError, RuntimeError or SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoints(output_dir)
        raise SystemExit(
            f"could not write checkpoint-{step} in {output_dir} ({type(err).__name__}: {err}): "
            f"{write_failure_reason(output_dir, previous)}. "
            + (f"The previous checkpoint {previous[-1].name} is intact: make room, then resume with "
               "--resume_from_checkpoint latest." if previous else "No earlier checkpoint exists.")) from err
    if accelerator.is_main_process:
        publish_folder(tmp, final)
        for old in checkpoints(output_dir)[:-limit] if limit else []:
            delete_folder(old)
    accelerator.wait_for_everyone()


def write_failure_reason(output_dir: Path, previous) -> str:
    """Why a write most likely failed; torch.save reports a short write without the OS error behind it."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"this process may not write files over {limit} bytes (ulimit -f)"
    free = shutil.disk_usage(output_dir).free
    needed = sum(f.stat().st_size for f in previous[-1].iterdir()) if previous else 0
    if free < max(needed, 1):
        return f"the disk is full ({free / 2**20:.0f} MiB free, a checkpoint takes {needed / 2**20:.0f} MiB)"
    return f"the disk may be full or failing ({free / 2**20:.0f} MiB free now)"


def resume(accelerator, output_dir: Path, requested: str) -> Optional[Path]:
    """Load the requested checkpoint, or with 'latest' the newest one that every process can read (an unreadable one
    is reported and skipped). Returns the folder loaded, None when there is none."""
    if requested != "latest":
        candidates = [Path(requested)]
    else:
        candidates = list(reversed(checkpoints(output_dir)))
        if not candidates:
            logger.info("no checkpoint in %s: starting from scratch", output_dir)
            return None
    for path in candidates:
        try:
            accelerator.load_state(str(path))
            failed, reason = 0.0, ""
        except Exception as err:  # truncated or corrupt file: the processes must agree before going on
            failed, reason = 1.0, f"{type(err).__name__}: {err}"
        if accelerator.reduce(torch.tensor([failed], device=accelerator.device), "sum").item() == 0:
            return path
        if requested != "latest":
            raise SystemExit(f"--resume_from_checkpoint {path} is unreadable ({reason or 'on another process'}); "
                             "pass an older checkpoint-N folder or 'latest'.")
        logger.warning("checkpoint %s is unreadable (%s): trying the previous one", path, reason or "on another process")
    raise SystemExit(f"no readable checkpoint in {output_dir}; remove the broken ones or start without "
                     "--resume_from_checkpoint.")


def ema_pipeline(model, ema, scheduler_config) -> DDPMPipeline:
    """A pipeline holding a copy of the model with the EMA weights (training weights untouched)."""
    unet = DDPMUNet.from_config(model.config)
    unet.load_state_dict(model.state_dict())
    if ema is not None:
        ema.copy_to(unet.parameters())
    pipe = DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_grid(pipe, args, path: Path):
    images = pipe(batch_size=args.num_sample_images, generator=torch.Generator().manual_seed(args.seed),
                  num_inference_steps=args.ddpm_num_inference_steps).images
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    image_grid(images).save(partial, format="PNG")
    os.replace(partial, path)  # never a truncated PNG under the final name
    return path


def public_config(args) -> dict:
    """The run's flags without the token: what goes to the trackers, training_config.json and the model card."""
    return {k: v for k, v in vars(args).items() if k != "hub_token"}


@contextlib.contextmanager
def hub_timeout(seconds: float):
    """huggingface_hub's HTTP client waits forever by default: a stalled server would freeze training. Within this
    block its shared client gives up after ``seconds`` without progress (huggingface_hub then retries, and so do we)."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)  # a user's proxy setup, say

    def client_with_timeout():
        client = previous()
        client.timeout = seconds
        return client

    huggingface_hub.set_client_factory(client_with_timeout)
    try:
        yield
    finally:
        huggingface_hub.set_client_factory(previous)


def push_with_retries(pipe, args, grid_path, step, backoff_s: float = 2.0) -> bool:
    """Upload the EMA pipeline. huggingface_hub retries 5xx answers, dropped connections and timeouts
    (--hub_timeout) itself, with backoff; on top of that the whole upload is tried --hub_push_attempts times with
    exponential backoff (backoff_s, 2·backoff_s, ...). A final failure is reported and training goes on. Local files
    are never modified and no token reaches the log."""
    import huggingface_hub
    from PIL import Image

    secrets = [args.hub_token, huggingface_hub.get_token()]
    for attempt in range(1, args.hub_push_attempts + 1):
        try:
            with hub_timeout(args.hub_timeout):
                pipe.push_to_hub(args.hub_model_id, private=args.hub_private_repo or None, token=args.hub_token,
                                 commit_message=f"ddpm_hf: EMA weights at step {step}",
                                 sample_grid=Image.open(grid_path) if grid_path else None,
                                 training_config=public_config(args))
            logger.info("pushed the EMA pipeline of step %d to %s", step, args.hub_model_id)
            return True
        except Exception as err:  # network, auth, server: report without the token and go on
            message = redact(f"{type(err).__name__}: {err}", secrets)
            logger.warning("push to %s failed (attempt %d/%d): %s", args.hub_model_id, attempt, args.hub_push_attempts,
                           message)
            if attempt < args.hub_push_attempts:
                time.sleep(min(backoff_s * 2 ** (attempt - 1), 60))
    logger.error("gave up pushing step %d to %s after %d attempts; training goes on and the pipeline stays in %s",
                 step, args.hub_model_id, args.hub_push_attempts, args.output_dir)
    return False


def write_outputs(accelerator, model, ema, scheduler, args, resolution: int, step: int, images: bool,
                  evaluate: bool, push: bool, final: bool) -> None:
    """What the main process makes from the EMA weights after a step: a sample grid, a bits/dim estimate, the final
    pipeline folder (published atomically), an upload."""
    output_dir = Path(args.output_dir)
    pipe = ema_pipeline(accelerator.unwrap_model(model), ema, scheduler.config)
    grid = sample_grid(pipe, args, output_dir / "samples" / f"step-{step:07d}.png") if (images or final) else None
    if evaluate:
        from ddpm_hf.evaluation import quick_bits_per_dim

        accelerator.log({"eval_bpd_estimate": quick_bits_per_dim(pipe, args, resolution)}, step=step)
    if final:
        tmp = output_dir / ".pipeline.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp)
        (tmp / "training_config.json").write_text(json.dumps(public_config(args), indent=2, default=str))
        fsync_tree(tmp)
        publish_folder(tmp, output_dir / "pipeline")
    if push:
        push_with_retries(pipe, args, grid, step)


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown the log
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and (accelerator.num_processes != launched or accelerator.distributed_type == DistributedType.NO):
        raise SystemExit(f"{launched} processes were launched but accelerate set up {accelerator.distributed_type} "
                         f"with {accelerator.num_processes} process(es): each would train alone. On CPU launch with "
                         "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`.")
    world, rank = accelerator.num_processes, accelerator.process_index
    streams = args.data_streams or world
    set_seed(args.seed)  # the same initial weights on every process

    model = build_model(args)
    resolution = args.resolution or model.config.sample_size
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    if resolution % factor:
        raise SystemExit(f"--resolution {resolution} is not a multiple of {factor}, which the model's "
                         f"{len(model.config.block_out_channels)} levels need.")
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                              variance_type=args.variance_type, prediction_type=args.prediction_type)
    loss_fn = make_loss(args.loss, scheduler, model.config.out_channels, model.config.in_channels)

    try:  # the data is opened and its first image read before any training: a bad dataset stops here
        dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.split,
                                     args.streaming, args.cache_dir)
        image_column = find_image_column(dataset.features, args.image_column)
        check_channels(first_image(dataset, image_column), model.config.in_channels)
        stream = TrainStream(dataset, image_column, resolution, model.config.in_channels, args.train_batch_size,
                             streams, rank, world, args.seed, args.shuffle_buffer_size, args.center_crop,
                             args.random_flip, record_ids=args.record_example_ids)
    except (OSError, ValueError) as err:
        raise SystemExit(f"dataset {args.dataset_name or args.train_data_dir} (split {args.split!r}): {err}") from err

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    ema = EMA(model.parameters(), args.ema_max_decay, args.ema_warmup) if args.use_ema else None
    progress = Progress()
    model, optimizer = accelerator.prepare(model, optimizer)
    for state in (lr_scheduler, stream, progress) + ((ema,) if ema else ()):
        accelerator.register_for_checkpointing(state)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        recover_folders(output_dir)
    accelerator.wait_for_everyone()
    if args.resume_from_checkpoint:
        path = resume(accelerator, output_dir, args.resume_from_checkpoint)
        if path is not None:
            logger.info("resumed from %s at step %d", path, progress.step)

    if accelerator.is_main_process:
        info = {"distributed_type": str(accelerator.distributed_type), "num_processes": world,
                "backend": getattr(accelerator.state, "backend", None), "model_wrapper": type(model).__name__,
                "data_streams": streams, "dataset_shards": dataset.num_shards}
        (output_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        tracker_config = {k: v for k, v in public_config(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("ddpm_hf", config=tracker_config)
    logger.info("process %d/%d, %s, data streams %s, %d examples per step in all", rank, world,
                accelerator.distributed_type, stream.streams, args.train_batch_size * streams)

    num_train = scheduler.config.num_train_timesteps
    global_batch = args.train_batch_size * streams * args.gradient_accumulation_steps
    bar = tqdm(total=args.max_train_steps, initial=progress.step, desc="training", unit="step",
               disable=not accelerator.is_main_process)
    started = last_time = time.perf_counter()
    resumed_at_end = progress.step >= args.max_train_steps
    skipped_steps = consecutive_nonfinite = 0
    while progress.step < args.max_train_steps:
        with accelerator.accumulate(model):
            images, uniforms, noise = stream.next_batch()
            x0, noise = images.to(accelerator.device), noise.to(accelerator.device)
            t = (uniforms * num_train).long().clamp(max=num_train - 1).to(accelerator.device)
            x_t = scheduler.add_noise(x0, noise, t)
            output = model(x_t, t).sample
            per_example = loss_fn(output, x0, x_t, t, noise)
            loss = per_example.mean()
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm) \
                if accelerator.sync_gradients else None
            # A NaN/Inf loss on any process makes the all-reduced gradient norm non-finite on every process, so all
            # of them skip the same update.
            finite = grad_norm is None or bool(torch.isfinite(grad_norm))
            if accelerator.scaler is not None:
                # fp16: the loss scaler skips overflowing updates and lowers its scale by itself; only a non-finite
                # loss (on any process) counts as a bad step.
                optimizer.step()
                if accelerator.sync_gradients:
                    bad_loss = torch.tensor([float(not torch.isfinite(loss))], device=accelerator.device)
                    finite = accelerator.reduce(bad_loss, "sum").item() == 0
                    if accelerator.optimizer_step_was_skipped and finite:
                        optimizer.zero_grad(set_to_none=True)
                        continue
            elif finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        if not finite:
            skipped_steps += 1
            consecutive_nonfinite += 1
            logger.warning("non-finite loss or gradient at step %d: update skipped (%d in a row, %d in all)",
                           progress.step + 1, consecutive_nonfinite, skipped_steps)
            if consecutive_nonfinite >= args.max_nonfinite_steps:
                raise SystemExit(f"{consecutive_nonfinite} non-finite losses in a row at step {progress.step + 1}: "
                                 "lower --learning_rate, check the data or use --mixed_precision no; the last "
                                 "checkpoint is intact.")
            continue
        consecutive_nonfinite = 0
        lr_scheduler.step()
        decay = ema.update(accelerator.unwrap_model(model).parameters()) if ema else 0.0
        progress.step += 1

        losses = accelerator.gather(per_example.detach()).float()
        steps = accelerator.gather(t).float()
        now = time.perf_counter()
        logs = {"loss": losses.mean().item(), "lr": lr_scheduler.get_last_lr()[0], "ema_decay": decay,
                "skipped_steps": skipped_steps,
                "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                "images_per_s": global_batch / max(now - last_time, 1e-9)}
        last_time = now
        for q in range(4):
            in_quartile = (steps >= q * num_train / 4) & (steps < (q + 1) * num_train / 4)
            if in_quartile.any():
                logs[f"loss_q{q}"] = losses[in_quartile].mean().item()
        accelerator.log(logs, step=progress.step)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_s']:.1f}")

        if args.max_train_minutes:  # every process must stop at the same step: agree on it
            out_of_time = float(time.perf_counter() - started > 60 * args.max_train_minutes)
            if accelerator.reduce(torch.tensor([out_of_time], device=accelerator.device), "sum").item() > 0:
                logger.info("time budget of %s minutes reached at step %d", args.max_train_minutes, progress.step)
                args.max_train_steps = progress.step
        final = progress.step == args.max_train_steps
        if args.checkpointing_steps and (progress.step % args.checkpointing_steps == 0 or final):
            save_checkpoint(accelerator, output_dir, progress.step, args.checkpoints_total_limit)
        want_images = args.save_images_steps and progress.step % args.save_images_steps == 0
        want_eval = args.eval_steps and progress.step % args.eval_steps == 0
        want_push = args.push_to_hub and (final or (args.push_checkpoints and args.checkpointing_steps
                                                    and progress.step % args.checkpointing_steps == 0))
        if accelerator.is_main_process and (want_images or want_eval or want_push or final):
            write_outputs(accelerator, model, ema, scheduler, args, resolution, progress.step, want_images, want_eval,
                          want_push, final)
        accelerator.wait_for_everyone()
    bar.close()
    if resumed_at_end and accelerator.is_main_process:
        # The launch that wrote the last checkpoint was stopped before its pipeline or upload was done: redo them.
        write_outputs(accelerator, model, ema, scheduler, args, resolution, progress.step, False, False,
                      args.push_to_hub, True)

    if args.record_example_ids:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        (output_dir / "logs" / f"example_ids_rank{rank}.txt").write_text("\n".join(stream.seen_ids) + "\n")
    if stream.skipped_rows:
        logger.warning("process %d skipped %d undecodable images", rank, stream.skipped_rows)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"pipeline: {output_dir / 'pipeline'}\nsamples: {output_dir / 'samples'}\n"
              f"checkpoints: {output_dir}/checkpoint-*\nlogs: {output_dir / args.logging_dir}")


if __name__ == "__main__":
    sys.exit(main())
