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
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet, PRESETS
from ddpm_hf.data import EMBEDDED_NAME, TrainStream, find_image_column, load_image_dataset
from ddpm_hf.ema import EMA
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
                     help="skip updates with a NaN/Inf loss; stop after this many in a row")
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
    args = p.parse_args(argv)

    defaults = dict(FALLBACKS, **training_defaults(args.preset))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.dataset_name is None and args.train_data_dir is None:
        args.dataset_name = EMBEDDED_NAME
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "ddpm_num_steps",
                 "ddpm_num_inference_steps", "num_sample_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("checkpointing_steps", "save_images_steps", "eval_steps", "lr_warmup_steps", "shuffle_buffer_size"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not args.max_grad_norm > 0:
        p.error(f"--max_grad_norm must be positive (use inf to disable clipping), got {args.max_grad_norm}")
    if not 0 < args.learning_rate < 1:
        p.error(f"--learning_rate must be in (0, 1), got {args.learning_rate}")
    if args.ddpm_num_inference_steps > args.ddpm_num_steps:
        p.error("--ddpm_num_inference_steps cannot exceed --ddpm_num_steps")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id namespace/name")
    return args


def build_model(args) -> DDPMUNet:
    if args.model_config:
        config = json.loads(Path(args.model_config).read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        config = unet_config(args.preset)
    if args.dropout is not None:
        config["dropout"] = args.dropout
    if args.variance_type in ("learned", "learned_range"):
        config["out_channels"] = 2 * config["in_channels"]
    model = DDPMUNet(**config)
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


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int):
    """accelerate.save_state into a hidden temporary folder, renamed when every process has written: a kill while
    saving leaves the previous checkpoint intact (and the half-written one is ignored and removed later)."""
    tmp, final = output_dir / f".checkpoint-{step}.tmp", output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[:-limit] if limit else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


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
    image_grid(images).save(path)
    return path


def push_with_retries(pipe, args, grid_path, step, attempts=3):
    """Upload the EMA pipeline; a failure is retried with backoff, then reported, and never stops training."""
    from PIL import Image

    for attempt in range(1, attempts + 1):
        try:
            pipe.push_to_hub(args.hub_model_id, private=args.hub_private_repo or None, token=args.hub_token,
                             commit_message=f"ddpm_hf: EMA weights at step {step}",
                             sample_grid=Image.open(grid_path) if grid_path else None,
                             training_config={k: v for k, v in vars(args).items() if k != "hub_token"})
            return True
        except Exception as err:  # network, auth, server: report without the token and go on
            message = str(err).replace(args.hub_token, "***") if args.hub_token else str(err)
            logger.warning("push to %s failed (attempt %d/%d): %s", args.hub_model_id, attempt, attempts, message)
            if attempt < attempts:
                time.sleep(min(2**attempt, 30))
    return False


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

    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.split,
                                 args.streaming, args.cache_dir)
    image_column = find_image_column(dataset.features, args.image_column)
    stream = TrainStream(dataset, image_column, resolution, model.config.in_channels, args.train_batch_size, streams,
                         rank, world, args.seed, args.shuffle_buffer_size, args.center_crop, args.random_flip,
                         record_ids=args.record_example_ids)

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

    if args.resume_from_checkpoint:
        found = checkpoints(output_dir)
        path = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint != "latest" else (found[-1] if found else None)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", output_dir)
        elif not path.is_dir():
            raise SystemExit(f"--resume_from_checkpoint {path}: no such checkpoint folder.")
        else:
            accelerator.load_state(str(path))
            logger.info("resumed from %s at step %d", path, progress.step)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        info = {"distributed_type": str(accelerator.distributed_type), "num_processes": world,
                "backend": getattr(accelerator.state, "backend", None), "model_wrapper": type(model).__name__,
                "data_streams": streams, "dataset_shards": dataset.num_shards}
        (output_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers("ddpm_hf", config=tracker_config)
    logger.info("process %d/%d, %s, data streams %s, %d examples per step in all", rank, world,
                accelerator.distributed_type, stream.streams, args.train_batch_size * streams)

    num_train = scheduler.config.num_train_timesteps
    global_batch = args.train_batch_size * streams * args.gradient_accumulation_steps
    bar = tqdm(total=args.max_train_steps, initial=progress.step, desc="training", unit="step",
               disable=not accelerator.is_main_process)
    started = last_time = time.perf_counter()
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
            if finite:
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
        if accelerator.is_main_process and (want_images or want_eval or final):
            pipe = ema_pipeline(accelerator.unwrap_model(model), ema, scheduler.config)
            grid = sample_grid(pipe, args, output_dir / "samples" / f"step-{progress.step:07d}.png") \
                if (want_images or final) else None
            if want_eval:
                from ddpm_hf.evaluation import quick_bits_per_dim

                bpd = quick_bits_per_dim(pipe, args, resolution)
                accelerator.log({"eval_bpd_estimate": bpd}, step=progress.step)
            if final:
                pipe.save_pretrained(output_dir / "pipeline")
                (output_dir / "pipeline" / "training_config.json").write_text(json.dumps(
                    {k: v for k, v in vars(args).items() if k != "hub_token"}, indent=2, default=str))
            if args.push_to_hub and (final or (args.push_checkpoints and args.checkpointing_steps
                                               and progress.step % args.checkpointing_steps == 0)):
                push_with_retries(pipe, args, grid, progress.step)
        accelerator.wait_for_everyone()
    bar.close()

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
