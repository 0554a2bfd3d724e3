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
Outputs in --output_dir, laid out like diffusers' example: the final EMA pipeline in the folder itself
(model_index.json, unet/, scheduler/, training_config.json: `DiffusionPipeline.from_pretrained(output_dir)` loads it),
and beside it checkpoint-N/ (accelerate state, written atomically), samples/step-N.png, logs/ (tensorboard) and
run_info.json.
"""

import contextlib
import json
import logging
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

# first: it notes the launcher before torch and the rest are imported, seconds (see die_with_launcher)
from ddpm_hf.processes import die_with_launcher, leave_process_group, stop_all, stop_on_sigterm

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedType, InitProcessGroupKwargs, ProjectConfiguration, TorchDynamoPlugin,
                               set_seed)
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ddpm_hf import DDPMScheduler, DDPMUNet, compiling
from ddpm_hf.checkpoints import (CheckpointSaver, check_output_dir_shared, checkpoints, clear_earlier_run,
                                 published_checkpoints, recover_folders, resume, save_pipeline,
                                 set_aside_later_checkpoints, starts_a_new_run, write_file)
from ddpm_hf.data import (TrainStream, all_processes, check_channels, dataset_revision, default_num_workers,
                          find_image_column, first_images, hub_dataset_id, known_row_groups, load_image_dataset,
                          remember_row_groups)
from ddpm_hf.ema import EMA
from ddpm_hf.errors import ResumeMismatch, is_out_of_memory, out_of_memory_detail, release_cached_memory
from ddpm_hf.hub import Uploads, check_push_target, hub_timeout, push_pipeline_with_retries, resolve_folder
from ddpm_hf.images import to_model_range
from ddpm_hf.losses import make_loss
from ddpm_hf.presets import unet_config
from ddpm_hf.scheduler import LEARNED_VARIANCE_TYPES
from ddpm_hf.seeds import dropout_seed, noise_seed
from ddpm_hf.training_args import card_config, parse_args, public_config, read_model_config

logger = logging.getLogger("ddpm_hf.train")

def load_pretrained(args) -> dict:
    """The U-Net and scheduler of --pretrained_model_name_or_path (a folder, or a Hub repo at --revision), read as
    ddpm-hf sample reads pipelines: a bad name, repo or file stops the run naming the flag."""
    from ddpm_hf.hub import load_components

    try:
        return load_components(args.pretrained_model_name_or_path, revision=args.revision, token=args.hub_token,
                               cache_dir=args.cache_dir, allow_pickle=args.allow_pickle)
    except (OSError, ValueError) as err:
        raise SystemExit(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: {err}") from err


def warn_of_another_diffusion(args, scheduler) -> None:
    """The diffusion comes from the flags, not from the pretrained pipeline's scheduler: where they differ, said."""
    flags = {"num_train_timesteps": "ddpm_num_steps", "beta_schedule": "ddpm_beta_schedule",
             "variance_type": "variance_type", "prediction_type": "prediction_type"}  # its key: the flag's
    differ = [f"--{flag} {getattr(args, flag)} (its {scheduler.config[key]})" for key, flag in flags.items()
              if scheduler.config[key] != getattr(args, flag)]
    if differ:
        logger.warning("%s was trained with another diffusion than the flags': %s; training goes on with the flags' "
                       "(pass its own to continue its diffusion)", args.pretrained_model_name_or_path,
                       ", ".join(differ))


def build_model(args, say: bool = True):
    """The U-Net of --pretrained_model_name_or_path (its config and weights), --model_config or --preset (with
    --dropout, --original_init, a doubled output for a learned variance, gradient checkpointing, --resolution as its
    sample_size) and the training resolution, checked against the model's levels. ``say``: warn where the
    pretrained pipeline's diffusion differs from the flags' (the main process)."""
    pretrained = None
    if args.pretrained_model_name_or_path:
        loaded = load_pretrained(args)
        pretrained = loaded["unet"]
        if say:
            warn_of_another_diffusion(args, loaded["scheduler"])
    source = args.pretrained_model_name_or_path or args.model_config or f"--preset {args.preset}"
    config = (dict(pretrained.config) if pretrained is not None else
              read_model_config(args.model_config) if args.model_config else unet_config(args.preset))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if args.resolution:  # the saved pipeline samples at the size it trained at (diffusers' example: sample_size=)
        config["sample_size"] = args.resolution
    if args.dropout is not None:
        config["dropout"] = args.dropout
    if args.variance_type in LEARNED_VARIANCE_TYPES:
        config["out_channels"] = 2 * config["in_channels"]
    elif pretrained is not None:  # a learned-variance model's doubled output has no use with a fixed variance
        config["out_channels"] = config["in_channels"]
    try:
        model = DDPMUNet(**config)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{source}: invalid U-Net config: {err}") from err
    if args.original_init:
        model.initialize_like_ddpm(torch.Generator().manual_seed(args.seed))
    if pretrained is not None:
        if model.config.out_channels != pretrained.config.out_channels:
            raise SystemExit(f"--variance_type {args.variance_type}: the U-Net predicts {model.config.out_channels} "
                             f"channels, {args.pretrained_model_name_or_path}'s {pretrained.config.out_channels}: pass "
                             "the --variance_type it was trained with (fixed_small or fixed_large for an ε-model, "
                             "learned_range or learned for one of twice the image's channels), or another model.")
        model.load_state_dict(pretrained.state_dict())  # (its config with the flags' --dropout and --resolution)
    resolution = model.config.sample_size
    if not isinstance(resolution, int):
        raise SystemExit(f"{source}: the U-Net config gives no sample_size (an int): pass --resolution.")
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    if resolution % factor:
        raise SystemExit(f"--resolution {resolution} is not a multiple of {factor}, which the model's "
                         f"{len(model.config.block_out_channels)} levels need.")
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, resolution


class LoopState:
    """What the training loop owns, checkpointed with the rest: the optimizer step count, and the randomness of each
    batch. The diffusion noise (t and ε of Algorithm 1) comes from one generator per data stream, so that a stream's
    examples get the same t and ε whichever process serves it; on a GPU they live there (drawing ε on the host would
    cost more than the step). The dropout masks come from torch's own generator, seeded before each batch from the
    process and the batch's number: other on every process (one seed everywhere gave every process the same masks),
    and the same after a resume, whatever drew from that generator in between (a sample grid, a bound estimate).
    ``settings``: the flags that say what is learnt (see :func:`objective_settings`); a resume under another
    diffusion or loss is refused, naming them, and another image size said."""

    def __init__(self, streams, per_stream_batch: int, seed: int, device: torch.device, process: int = 0,
                 settings: Optional[dict] = None, next_epoch_on_resume: bool = False):
        self.step = 0
        self.batches: Optional[int] = 0  # the micro-batches drawn, skipped updates' included: each has its own masks
        self.per_stream_batch, self.seed, self.process = per_stream_batch, seed, process
        self.settings = dict(settings or {})
        self.device, self.next_epoch_on_resume = device, next_epoch_on_resume
        self.generators = self._seeded(streams)

    def _seeded(self, streams, from_step: int = 0) -> dict:
        """A generator of diffusion noise per stream, from the run's start or ``from_step`` (see noise_seed)."""
        return {v: torch.Generator(self.device).manual_seed(noise_seed(self.seed, v, from_step)) for v in streams}

    def draw(self, x0: torch.Tensor, num_train_timesteps: int):
        """t ~ U{0..T−1} (0-based, the paper's t − 1) and ε ~ N(0, I) for the batch ``x0``, stream by stream; seeds
        the dropout masks the model then draws for it."""
        t, noise = [], []
        for v, chunk in zip(self.generators, x0.split(self.per_stream_batch)):
            g = self.generators[v]
            uniform = torch.rand(len(chunk), generator=g, dtype=torch.float64, device=g.device)
            t.append((uniform * num_train_timesteps).long().clamp(max=num_train_timesteps - 1))
            noise.append(torch.randn(chunk.shape, generator=g, device=g.device))
        if self.batches is not None:
            torch.manual_seed(dropout_seed(self.seed, self.process, self.batches))  # the host's and the GPUs'
            self.batches += 1
        return torch.cat(t).to(x0.device), torch.cat(noise).to(x0.device, x0.dtype)

    def state_dict(self):
        """The step, the batches drawn and every stream's generator, the other processes' included (see
        TrainStream.state_dict)."""
        return all_processes({"step": self.step, "batches": self.batches, "settings": self.settings,
                              "noise": {v: g.get_state() for v, g in self.generators.items()}})

    def load_state_dict(self, state):
        saved = state.get("settings") or {}  # (none in checkpoints before they were kept)
        changed = {name: f"--{name} {value} (the checkpoint's: {saved[name]})" for name, value in self.settings.items()
                   if name in saved and saved[name] != value}
        if "resolution" in changed:  # training on at another size is a recipe of its own (progressive resizing)
            logger.warning("resuming at another image size: %s; the pipeline will sample at the new one",
                           changed.pop("resolution"))
        if changed:
            raise ResumeMismatch("this run would learn another thing than the checkpoint's: "
                                 f"{', '.join(changed.values())}. "
                                 "Resume with the checkpoint's flags, or start a new run in another --output_dir from "
                                 "its weights (--pretrained_model_name_or_path with a pipeline folder).")
        self.step = state["step"]
        # None: a run begun before the masks were seeded per batch goes on drawing them as it did, from the generator
        # accelerate restores (so that it still ends where it would have)
        self.batches = state.get("batches")
        if self.next_epoch_on_resume:  # the data begins anew, and so does its noise (not the run's first steps')
            self.generators = self._seeded(self.generators, self.step)
        elif "noise" in state:  # checkpoints before 0.2 kept it in the data stream (see start_run)
            self.load_noise_state(state["noise"])

    def load_noise_state(self, noise_state):
        cpu_state_size = len(torch.Generator("cpu").get_state())
        for v in self.generators:
            g_state = noise_state[v]
            if len(g_state) != len(self.generators[v].get_state()):
                if len(g_state) != cpu_state_size:  # a GPU's generator (its seed and offset), resumed without one
                    raise ResumeMismatch("the checkpoint's diffusion noise came from a GPU's generator, which this "
                                         "machine has not: resume it on a GPU, or start a new run.")
                # written on the CPU, resumed on a GPU: continue that generator on the CPU, so that the run goes on
                # with exactly the noise it would have drawn
                self.generators[v] = torch.Generator("cpu")
            self.generators[v].set_state(g_state)


def objective_settings(args, resolution: int) -> dict:
    """The flags that say what the network learns: the diffusion and the loss, which a resume keeps (it would go on
    learning another thing, and label its pipeline with the new flags), and the images' size, which it may change,
    saying so (progressive resizing); the optimiser's, the data's and the outputs' flags may change."""
    names = ("ddpm_num_steps", "ddpm_beta_schedule", "prediction_type", "variance_type", "loss", "snr_gamma")
    return {**{name: getattr(args, name) for name in names}, "resolution": resolution}


def make_accelerator(args, dynamo_settings: bool = False) -> Accelerator:
    """The Accelerator, with the run's precision, trackers and folders, without accelerate's dynamo settings (see
    :func:`compile_options`; ``dynamo_settings``: they were set); refuses a launch that would not be DDP."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        dynamo_plugin=TorchDynamoPlugin(backend="no"),  # accelerate's dynamo settings: see compile_options
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown the log
    for client in ("httpx", "httpx2"):  # huggingface_hub's HTTP client: a line per request, per file of a dataset
        logging.getLogger(client).setLevel(logging.WARNING)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and (accelerator.num_processes != launched or accelerator.distributed_type == DistributedType.NO):
        raise stop_all(f"{launched} processes were launched but accelerate set up {accelerator.distributed_type} "
                         f"with {accelerator.num_processes} process(es): each would train alone. On CPU launch with "
                         "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`.")
    # Without --mixed_precision, accelerate's own setting decides (`accelerate launch --mixed_precision`, or
    # `accelerate config`'s under `accelerate launch`; diffusers' example passes "no" instead): the precision in
    # force is the run's, said and written in training_config.json, and fp16 needs the CUDA loss scaler whoever
    # asked for it (on the CPU accelerate would report fp16 and train in float32).
    setting = os.environ.get("ACCELERATE_MIXED_PRECISION")
    asked = ("--mixed_precision" if args.mixed_precision is not None else
             f"accelerate's setting (ACCELERATE_MIXED_PRECISION={setting})" if setting else "the default")
    args.mixed_precision = accelerator.mixed_precision
    if args.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise stop_all(f"mixed precision fp16, from {asked}: this script trains fp16 with CUDA's loss scaler only, "
                       f"and this run is on {accelerator.device.type}; pass --mixed_precision bf16 or no.")
    logger.info("mixed precision: %s (from %s)", args.mixed_precision, asked)
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:  # accelerate's wins, as it runs
        if accelerator.is_main_process:
            logger.warning("gradient accumulation: %d micro-batches per update, from accelerate's setting "
                           "(ACCELERATE_GRADIENT_ACCUMULATION_STEPS in the environment; `accelerate launch` sets it "
                           "for DeepSpeed), not --gradient_accumulation_steps %d",
                           accelerator.gradient_accumulation_steps, args.gradient_accumulation_steps)
        args.gradient_accumulation_steps = accelerator.gradient_accumulation_steps
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif dynamo_settings and accelerator.mixed_precision == "no":  # what accelerate does with them
        torch.backends.cuda.matmul.allow_tf32 = True
    # Every step convolves the same shapes: cuDNN times its algorithms once per shape and keeps the fastest, where
    # its default picks by heuristics (bench/gpu.sh times both). No effect on the CPU.
    torch.backends.cudnn.benchmark = True
    return accelerator


def compile_options(args) -> Tuple[Optional[dict], str]:
    """torch.compile's arguments for the U-Net and the setting they come from: accelerate's torch dynamo settings
    when set, else torch's defaults under --compile (see ddpm_hf.compiling). The U-Net is compiled in place:
    prepare() would wrap it in torch.compile's OptimizedModule, whose weights every checkpoint and pipeline would
    then name `_orig_mod.*`, so the Accelerator is made without them."""
    try:
        return compiling.compile_options(args.compile)
    except ValueError as err:
        raise SystemExit(str(err)) from err


def resumed_run_info(args) -> dict:
    """run_info.json of the run --resume_from_checkpoint continues ({} for a new run, or where there is none)."""
    if not args.resume_from_checkpoint:
        return {}
    run = Path(args.output_dir) if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint).parent
    if not checkpoints(run):  # 'latest' with none: a new run
        return {}
    try:
        info = json.loads((run / "run_info.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def dataset_revision_to_read(args) -> Optional[str]:
    """The Hub dataset's commit to read: --dataset_revision, else, resuming, the one the checkpoints' run read (its
    run_info.json): a push since, even of the dataset's card alone, would otherwise end the resume, whose examples
    must be the ones the run would have read. None: the main branch as it is now (or a local dataset)."""
    if args.dataset_revision or not hub_dataset_id(args.dataset_name):
        return args.dataset_revision
    revision = resumed_run_info(args).get("dataset_revision")
    if revision:
        logger.info("resuming: the Hub dataset %s is read at commit %s, as its checkpoints were (whatever its main "
                    "branch holds now; --dataset_revision chooses another)", args.dataset_name, revision)
    return revision


def open_dataset(args, accelerator):
    """The dataset opened, its repo, token, config, split and shards checked (a Hub dataset's by the main process, a
    local folder's by one process per machine): a bad dataset stops
    here, named, before anything is built. Every process reads a Hub dataset at the main process's commit (a push
    while the processes opened it would give them different files), a resume at its checkpoints' commit."""
    from accelerate.utils import gather_object

    # a Hub dataset is the same files for all: its main process checks them; a local folder may be each machine's copy
    checker = accelerator.is_main_process if hub_dataset_id(args.dataset_name) else accelerator.is_local_main_process

    def load(revision):
        try:
            return load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.split,
                                      args.streaming, args.cache_dir, token=args.hub_token, revision=revision,
                                      check_shards=checker)
        except (OSError, ValueError) as err:
            raise SystemExit(f"dataset {args.dataset_name or args.train_data_dir} (split {args.split!r}): {err}") from err

    revision = dataset_revision_to_read(args)
    if accelerator.num_processes == 1:
        return load(revision)
    try:
        dataset, failure = load(revision), None
    except SystemExit as err:  # only the checking processes read the shards: the others must not wait for them
        dataset, failure = None, str(err.code)
    commit = dataset_revision(dataset) if dataset is not None else None
    # the row groups of a Hub dataset's parquet shards, whose footers the main process's check read: every process's
    # resume needs them, which it would otherwise ask the Hub for, one request per shard and process
    row_groups = known_row_groups() if accelerator.is_main_process and dataset is not None else {}
    outcomes = gather_object([(failure, commit, row_groups)])
    failures = [f for f, _, _ in outcomes if f is not None]
    if failures:
        raise stop_all(failure or failures[0])
    main_commit = outcomes[0][1]
    remember_row_groups(outcomes[0][2])
    if main_commit is not None and commit != main_commit:
        dataset = load(main_commit)
    return dataset


def open_train_stream(args, dataset, model, resolution: int, rank: int, world: int,
                      local_processes: int, pin_memory: bool, is_main_process: bool = True) -> TrainStream:
    """The training stream over ``dataset``, its image column found and its first image read (by the main process)
    before any training: data the model cannot take stops here, named."""
    try:
        image_column = find_image_column(dataset.features, args.image_column)
        if is_main_process:  # one process suffices (the others would download the first shard's rows too)
            check_channels(first_images(dataset, image_column, token=args.hub_token), model.config.in_channels)
        workers = args.dataloader_num_workers
        return TrainStream(dataset, image_column, resolution, model.config.in_channels, args.train_batch_size,
                           args.data_streams, rank, world, args.seed, args.shuffle_buffer_size, args.center_crop,
                           args.random_flip, record_ids=args.record_example_ids,
                           num_workers=default_num_workers(local_processes) if workers is None else workers,
                           pin_memory=pin_memory, token=args.hub_token,
                           next_epoch_on_resume=args.next_epoch_on_resume)
    except (OSError, ValueError) as err:
        raise SystemExit(f"dataset {args.dataset_name or args.train_data_dir} (split {args.split!r}): {err}") from err


def compile_model(model, loss_fn, batch: int, resolution: int, device, options: dict, source: str) -> None:
    """``torch.compile(**options)`` the U-Net in place, checked by one training forward and backward of the prepared
    model (with its autocast) on a dummy batch: a compiler failure stops the run here, before any training, naming
    ``source``, the setting that asked for it. The random state is left as it was."""
    unet = getattr(model, "module", model)  # inside DDP
    c = unet.config

    def probe():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            x0 = torch.zeros(batch, c.in_channels, resolution, resolution, device=device)
            t = torch.zeros(batch, dtype=torch.long, device=device)
            loss_fn(model(x0, t).sample, x0, x0, t, x0).mean().backward()

    logger.info("torch.compile of the U-Net in place, asked by %s: %s", source, options or "torch's defaults")
    try:
        compiling.compile_checked(unet, probe, options, source, "train")
    except RuntimeError as err:
        if is_out_of_memory(err):  # the batch does not fit: see out_of_memory
            raise
        raise SystemExit(str(err)) from err
    unet.zero_grad(set_to_none=True)


class Update:
    """An optimizer update as the loop counts it: whether it was finite and whether the fp16 loss scaler skipped it
    (known at once, or flags on their way back from the device, see :meth:`finite`), its gradient norm, and the
    sums of its micro-batches' losses for the logs (:func:`loss_sums`)."""

    def __init__(self, finite, grad_norm=None, overflow=False):
        self.grad_norm, self.loss_sums = grad_norm, None
        self._flags, self._copied = (finite, overflow), None
        if torch.is_tensor(finite):  # one copy to the host; the fp16 scaler's overflow flag (a tensor) goes with it
            self._flags = (torch.stack([finite.reshape(()), overflow.reshape(())]) if torch.is_tensor(overflow)
                           else finite.reshape(1))
            if finite.device.type == "cuda":  # copied behind the update's kernels
                self._flags, self._copied = self._flags.to("cpu", non_blocking=True), torch.cuda.Event()
                self._copied.record()

    @property
    def decided_on_device(self) -> bool:
        """The device skipped the update or not by itself; the host may learn which later (one step later, the
        loop queues the next step meanwhile instead of waiting for this one)."""
        return torch.is_tensor(self._flags)

    def _read(self) -> Tuple[bool, bool]:
        if self._copied is not None:
            self._copied.synchronize()  # this update's kernels only, not the work queued since
        flags = [bool(flag) for flag in self._flags]
        return flags[0], len(flags) > 1 and flags[1]  # (a device's finite flag alone: no loss scaler)

    def finite(self) -> bool:
        return self._read()[0]

    def overflow(self) -> bool:
        """The fp16 loss scaler skipped this (finite) update and lowered its scale."""
        return self._read()[1]


def optimizer_step(accelerator, model, optimizer, loss, max_grad_norm) -> Update:
    """Clip and step; an update whose loss or gradient is NaN/Inf on any process is skipped by every process (the
    all-reduced gradient norm is non-finite everywhere). A fused optimizer (on CUDA) skips it on the device, as the
    fp16 loss scaler has it do (its ``found_inf``), so the host need not wait for the gradient norm; otherwise the
    host reads the norm and steps only a finite update. The fp16 loss scaler skips an overflowing update itself
    (it lowers its scale; not a bad step)."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if accelerator.sync_gradients else None
    inner = optimizer.optimizer  # the torch optimizer in accelerate's wrapper
    if accelerator.scaler is not None:
        # The scaler skips an overflowing update itself and halves its scale; read on the device, not as accelerate's
        # optimizer_step_was_skipped, which a fused AdamW (given the scaler's found_inf) never sets. A non-finite
        # loss in any micro-step of the update (kept on the optimizer between them) makes it a bad step, not an
        # overflow, though the scaler takes its gradients for one.
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        bad = optimizer.__dict__.pop("nonfinite_losses", 0) + bad
        scale = accelerator.scaler._scale.clone() if accelerator.sync_gradients else None
        optimizer.step()
        update = Update(True, grad_norm)
        if not accelerator.sync_gradients:
            optimizer.nonfinite_losses = bad
        else:
            finite = accelerator.reduce(bad, "sum")[0] == 0  # on every process: the same answer, no host read
            update = Update(finite, grad_norm, overflow=finite & (accelerator.scaler._scale.reshape(()) < scale))
    elif grad_norm is not None and inner.defaults.get("fused"):
        inner.found_inf = (~torch.isfinite(grad_norm)).float()  # 1: the kernel leaves weights and moments as they are
        try:
            optimizer.step()
        finally:
            finite = inner.__dict__.pop("found_inf") == 0
        update = Update(finite, grad_norm)
    else:
        update = Update(grad_norm is None or bool(torch.isfinite(grad_norm)), grad_norm)
        if update.finite():
            optimizer.step()
    optimizer.zero_grad(set_to_none=accelerator.gradient_accumulation_steps == 1)  # see keep_gradient_buffers
    return update


def keep_gradient_buffers(model) -> None:
    """With --gradient_accumulation_steps above 1, the gradients accumulate in buffers of their own, zeroed in place
    after each update (see optimizer_step). Otherwise the first micro-step's gradients would become the buffers,
    and a U-Net compiled with CUDA graphs hands them out in the graphs' memory, which the next micro-step's replay
    overwrites before they are added to (torch stops: "accessing gradient tensor output of CUDAGraphs that has been
    overwritten")."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def ema_pipeline(model, ema, scheduler_config, device: Optional[torch.device] = None):
    """A DDPMPipeline holding a copy of the model with the EMA weights (training weights untouched), on ``device``,
    by default the model's: a GPU run samples its grids there, not for minutes on the host between two steps (MPS,
    which has no float64 for the bits/dim estimate, keeps the host)."""
    from ddpm_hf.pipelines import DDPMPipeline  # here, not above: diffusers' pipeline module takes seconds to import

    device = device or next(model.parameters()).device
    with torch.device("meta"):  # every weight comes from the model: none drawn first (0.14 s for ddpm-cifar10 here)
        unet = DDPMUNet.from_config(model.config)
    unet = unet.to_empty(device=device if device.type != "mps" else "cpu")
    unet.load_state_dict(model.state_dict())  # (strict: a weight left out would stay uninitialised memory)
    if ema is not None:
        ema.copy_to(unet.parameters())
    pipe = DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_grid(pipe, args, path: Path, accelerator, step: int):
    """The EMA pipeline's samples as a grid in ``path``, and in the trackers (TensorBoard's images, W&B's media) as
    diffusers' example logs its test samples."""
    from ddpm_hf.pipelines import image_grid

    # a bar of its own: the grid of the paper's chain is minutes on a CPU (ema_pipeline's bar is off)
    pipe.set_progress_bar_config(desc=f"sample grid of step {step}", leave=False, disable=False)
    try:
        images = pipe(batch_size=args.num_sample_images, generator=torch.Generator().manual_seed(args.seed),
                      num_inference_steps=args.ddpm_num_inference_steps).images
    finally:
        pipe.set_progress_bar_config(disable=True)
    written = write_file(path, lambda partial: image_grid(images).save(partial, format="PNG"), Path(args.output_dir))
    pixels = np.stack([np.asarray(image).reshape(image.height, image.width, -1) for image in images])  # N, H, W, C
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("samples", pixels, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": images}, step=step)
    return written


def push_with_retries(pipe, args, grid_path, step, backoff_s: float = 2.0) -> bool:
    """The EMA pipeline to --hub_model_id, with the run's --hub_* settings (see push_pipeline_with_retries)."""
    return push_pipeline_with_retries(pipe, args.hub_model_id, step=step, token=args.hub_token,
                                      private=args.hub_private_repo, attempts=args.hub_push_attempts,
                                      grid_path=grid_path,
                                      training_config=card_config(args),
                                      local_dir=args.output_dir if step >= args.max_train_steps  # (the final one)
                                      else str(Path(args.output_dir) / f"checkpoint-{step}"),
                                      datasets=[d for d in [hub_dataset_id(args.dataset_name)] if d],
                                      base_model=pretrained_hub_id(args), backoff_s=backoff_s)


def pretrained_revision_to_read(args) -> Optional[str]:
    """The commit of a Hub --pretrained_model_name_or_path to read: --revision, else, resuming, the one the run
    started from (its run_info.json), which its training_config.json and card go on naming; the checkpoint's
    weights replace the pretrained ones all the same. None: the main branch as it is now."""
    if args.revision or not pretrained_hub_id(args):
        return args.revision
    info = resumed_run_info(args)
    revision = info.get("pretrained_revision") if info.get("pretrained_model") == pretrained_hub_id(args) else None
    if revision:
        logger.info("resuming: %s is read at commit %s, the one the run started from (--revision chooses another)",
                    args.pretrained_model_name_or_path, revision)
    return revision


def pretrained_hub_id(args) -> Optional[str]:
    """--pretrained_model_name_or_path when it is a Hub repo (not a local folder): the model card's base_model."""
    name = args.pretrained_model_name_or_path
    return name if name and not Path(name).expanduser().is_dir() else None


def bits_per_dim_images(args, resolution: int, channels: int, revision: Optional[str]) -> torch.Tensor:
    """The first 64 images of --eval_split, which the bits/dim estimate of --eval_steps evaluates: read once, before
    training, so that a dataset without that split stops the run now (not at step --eval_steps, and again at each
    resume), and no estimate depends on the network. A Hub dataset's at ``revision``, the commit training reads."""
    from ddpm_hf.evaluation import load_eval_images

    try:
        return load_eval_images(args.dataset_name, 64, resolution, channels, split=args.eval_split,
                                dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
                                image_column=args.image_column, token=args.hub_token, revision=revision,
                                cache_dir=args.cache_dir)
    except (OSError, ValueError) as err:
        raise SystemExit(f"--eval_steps {args.eval_steps} estimates bits/dim on the {args.eval_split!r} split: {err} "
                         "Pass --eval_split with a split of the dataset, or --eval_steps 0.") from err


def write_outputs(accelerator, model, ema, scheduler, args, step: int, images: bool, evaluate: bool, push: bool,
                  final: bool, uploads: Uploads, bpd_images: Optional[torch.Tensor] = None) -> None:
    """What the main process makes from the EMA weights after a step: a sample grid, a bits/dim estimate (of
    ``bpd_images``), the final pipeline (published atomically in --output_dir), an upload (see Uploads)."""
    output_dir = Path(args.output_dir)
    if not (images or evaluate or final or push):
        return
    pipe = ema_pipeline(accelerator.unwrap_model(model), ema, scheduler.config)
    grid = None
    if images or final or push:  # (an upload's grid made once, here, not at each of its attempts)
        grid = unless_out_of_memory(pipe.device, f"the sample grid of step {step}",
                                    f"lower --num_sample_images ({args.num_sample_images})",
                                    lambda: sample_grid(pipe, args, output_dir / "samples" / f"step-{step:07d}.png",
                                                        accelerator, step))
    if evaluate and bpd_images is not None:
        from ddpm_hf.evaluation import quick_bits_per_dim

        estimate = unless_out_of_memory(
            pipe.device, f"the bits/dim estimate of step {step}", "turn it off with --eval_steps 0 and estimate "
            "afterwards with `ddpm-hf evaluate --metrics bpd --batch_size N`",
            lambda: quick_bits_per_dim(pipe, bpd_images))
        if estimate is not None:
            accelerator.log({"eval_bpd_estimate": estimate}, step=step)
    if final:
        save_pipeline(pipe, output_dir, public_config(args))
    if push:
        uploads.push(pipe, grid, step, final)


def unless_out_of_memory(device: torch.device, what: str, fix: str, work):
    """``work()``; if it runs out of memory, a warning that ``what`` was skipped and how to ``fix`` it, the memory it
    held released, and None: samples and estimates watch a run, they must not end it (the final pipeline is saved
    after its grid, with or without it)."""
    try:
        return work()
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        logger.warning("out of memory on %s making %s (%s): skipped, training goes on; %s.", device, what,
                       out_of_memory_detail(err, device), fix)
    release_cached_memory(device)  # only here: the failed work's tensors went with its exception
    return None


def out_of_memory(err: BaseException, args, accelerator, doing: str, images: int, shape: Tuple[int, int]) -> SystemExit:
    """The error that stops a run whose training step does not fit in memory: where, the batch, what holds the
    memory, the flags that make the step fit, and the checkpoint to resume from (checkpoints are written whole
    between steps: a step that failed changed none)."""
    device = accelerator.device
    fixes = ["lower --train_batch_size (raising --gradient_accumulation_steps keeps the batch)"]
    if not args.gradient_checkpointing:
        fixes.append("add --gradient_checkpointing (recomputes activations in the backward pass)")
    if accelerator.mixed_precision == "no" and device.type == "cuda" and bf16_in_hardware():
        fixes.append("train in --mixed_precision bf16")
    channels, resolution = shape
    return SystemExit(f"out of memory on {device} in {doing}, {images} images of {channels}×{resolution}×{resolution} "
                      f"per process ({out_of_memory_detail(err, device)}): {'; or '.join(fixes)}. "
                      f"{where_to_resume(args)}.")


def bf16_in_hardware() -> bool:
    """Whether this GPU computes bf16 itself (Ampere and later), not by emulation (V100, T4)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3: no emulation counted
        return torch.cuda.is_bf16_supported()


def outputs_out_of_memory(err: BaseException, args, device: torch.device, step: int) -> SystemExit:
    """The error that stops a run with no memory left to copy its network for the outputs of a finished step (the
    EMA pipeline for samples, estimates, the final pipeline and uploads)."""
    return SystemExit(f"out of memory on {device} making the outputs of step {step}, a copy of the network with the "
                      f"EMA weights ({out_of_memory_detail(err, device)}): training leaves no room for it; "
                      f"lower --train_batch_size or add --gradient_checkpointing. {where_to_resume(args)} (a run "
                      "resumed at its last step writes its pipeline).")


def where_to_resume(args) -> str:
    """The checkpoint a stopped run resumes from, said for its error message."""
    latest = published_checkpoints(Path(args.output_dir))
    return (f"{latest[-1].name} is intact: resume from it with --resume_from_checkpoint latest" if latest
            else "no checkpoint was written yet")


class Throughput:
    """Images/s the model consumed and the fraction of wall time spent waiting for batches, per logging interval
    and in all (the first interval, with its compilation and start-up, left out of the total)."""

    def __init__(self):
        self.interval_start = time.perf_counter()
        self.images = self.wait = 0.0
        self.total = {"images": 0.0, "wait": 0.0, "seconds": 0.0}
        self.first = True

    def waited(self, seconds: float, images: int):
        self.wait, self.images = self.wait + seconds, self.images + images

    def interval(self) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self.interval_start, 1e-9)
        logs = {"images_per_s": self.images / elapsed, "data_wait": self.wait / elapsed}
        if self.first:
            self.first = False
        else:
            for key, value in (("images", self.images), ("wait", self.wait), ("seconds", elapsed)):
                self.total[key] += value
        self.interval_start, self.images, self.wait = now, 0.0, 0.0
        return logs

    def summary(self) -> str:
        seconds = max(self.total["seconds"], 1e-9)
        return (f"{self.total['images'] / seconds:.1f} images/s, data_wait {100 * self.total['wait'] / seconds:.2f} % "
                f"over {seconds:.1f} s ({self.total['images']:.0f} images of all processes; the first logging "
                "interval left out)")


def decided_by_main(accelerator, decide, what: str):
    """``decide()`` on the main process, its result on every process; its failure (ValueError, OSError) stops every
    process with its message: the others would wait for the main one at their next meeting instead."""
    from accelerate.utils import broadcast_object_list

    outcome, error = [None, None], None  # the result, or why it failed
    if accelerator.is_main_process:
        try:
            outcome[0] = decide()
        except (OSError, ValueError) as err:
            outcome[1] = f"{what}: {err}"
        except Exception as err:  # a bug: raised as it is, once the others know to stop
            outcome[1], error = f"{what}: {type(err).__name__}: {err} (see the main process's traceback)", err
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise stop_all(outcome[1])
    return outcome[0]


def main(argv=None):
    die_with_launcher()  # under `accelerate launch`: a launcher killed by SIGKILL takes this process with it
    stop_on_sigterm()  # a scheduler's or the launcher's SIGTERM: cleanups run, the checkpoint in flight is finished
    args = parse_args(argv)
    # huggingface_hub's client gives up on a stalled Hub after --hub_timeout, for the whole run (see hub_timeout)
    try:
        with hub_timeout(args.hub_timeout) if args.push_to_hub else contextlib.nullcontext():
            return run(args)
    except KeyboardInterrupt:  # Ctrl-C: what is kept said in a line, not in a traceback through the library
        if os.environ.get("RANK", "0") == "0":
            latest = published_checkpoints(Path(args.output_dir))
            print("stopped by Ctrl-C. " + (f"{latest[-1]} is the newest checkpoint: continue the run with "
                                            "--resume_from_checkpoint latest." if latest else
                                            "No checkpoint was written: the run would start anew."), file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except ResumeMismatch as err:  # the data's order is not the one its position counted in (see TrainStream)
        raise SystemExit(f"cannot go on exactly: {err}") from None
    finally:  # every process, whatever stopped it (the processes often stop together: see leave_process_group)
        leave_process_group(failed=sys.exc_info()[1] is not None)


def run(args):
    """The training run of main()'s flags ``args``."""
    compile_kwargs, asked_by = compile_options(args)  # accelerate's dynamo settings, checked before anything loads
    accelerator = make_accelerator(args, dynamo_settings=asked_by.startswith("accelerate"))
    device, world = accelerator.device, accelerator.num_processes
    args.data_streams = args.data_streams or world  # (resolved: training_config.json, the trackers and the card say it)
    check_output_dir_shared(accelerator, Path(args.output_dir))  # one folder for all machines, or stop now
    # a new run (from scratch or another run's checkpoint) not beside an earlier run's checkpoints nor over its
    # pipeline (decided once: one listing for all)
    new_run = decided_by_main(accelerator, lambda: starts_a_new_run(Path(args.output_dir), args.resume_from_checkpoint,
                                                                    args.overwrite_output_dir), "a new run")

    # --- the model, the diffusion (scheduler) and the loss: bad flags stop here, before the Hub is asked anything ---
    set_seed(args.seed)  # the same initial weights on every process
    if args.pretrained_model_name_or_path:  # downloaded by the main process first, a failure said on every process
        args.revision = pretrained_revision_to_read(args)
        folder = decided_by_main(accelerator, lambda: str(resolve_folder(
            args.pretrained_model_name_or_path, args.revision, args.hub_token, args.cache_dir,
            allow_pickle=args.allow_pickle)), "--pretrained_model_name_or_path")
        if pretrained_hub_id(args):  # a Hub repo: its snapshot's folder is its commit, which every process loads
            args.revision = Path(folder).name  # and the run records
    model, resolution = build_model(args, say=accelerator.is_main_process)
    scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                              variance_type=args.variance_type, prediction_type=args.prediction_type)
    try:
        loss_fn = make_loss(args.loss, scheduler, model.config.out_channels, model.config.in_channels,
                            args.snr_gamma)
    except ValueError as err:  # e.g. a --model_config whose output channels do not fit the variance type
        raise SystemExit(f"{args.model_config or '--preset ' + args.preset}: {err}") from err
    num_train_timesteps = scheduler.config.num_train_timesteps
    if args.push_to_hub:  # a token that cannot write there stops here, not at the first upload (nor after a download)
        args.hub_model_id = decided_by_main(accelerator, lambda: check_push_target(
            args.hub_model_id, args.hub_token, args.hub_private_repo), "--push_to_hub")
    dataset = open_dataset(args, accelerator)  # a bad repo, token, split or shard stops here

    # --- data: uint8 batches prefetched by background workers ------------------------------------------------------
    stream = open_train_stream(args, dataset, model, resolution, accelerator.process_index, world,
                               local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                               pin_memory=device.type == "cuda", is_main_process=accelerator.is_main_process)
    bpd_images = (bits_per_dim_images(args, resolution, model.config.in_channels, stream.revision)  # (the main one)
                  if args.eval_steps and accelerator.is_main_process else None)

    # --- optimiser, EMA, the state a checkpoint holds, resume ------------------------------------------------------
    optimizer, lr_scheduler = make_optimizer(args, model, device)
    loop = LoopState(stream.streams, args.train_batch_size, args.seed, device, accelerator.process_index,
                     objective_settings(args, resolution), args.next_epoch_on_resume)
    model, optimizer = accelerator.prepare(model, optimizer)
    # after prepare: the average lives on the device of the weights it follows
    power_ramp = None if args.ema_inv_gamma is None else (args.ema_inv_gamma, args.ema_power)  # diffusers' ramp
    ema = (EMA(accelerator.unwrap_model(model).parameters(), args.ema_max_decay, args.ema_warmup, power_ramp)
           if args.use_ema else None)
    for state in (lr_scheduler, stream, loop) + ((ema,) if ema else ()):
        accelerator.register_for_checkpointing(state)
    images, shape = args.train_batch_size * len(stream.streams), (stream.settings.channels, resolution)  # per process
    if compile_kwargs is not None:
        try:
            compile_model(model, loss_fn, images, resolution, device, compile_kwargs, asked_by)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            raise out_of_memory(err, args, accelerator, "the check of the compiled U-Net (one training step)",
                                images, shape) from err
    if args.gradient_accumulation_steps > 1:
        keep_gradient_buffers(model)
    started = start_run(accelerator, args, model, stream, loop, ema, new_run)
    take_the_flags_optimizer_settings(args, optimizer, lr_scheduler,  # (resumed: the checkpoint's were loaded)
                                      say=accelerator.is_main_process)
    if args.record_example_ids:
        stream.record_ids_in(Path(args.output_dir) / "logs", loop.step)

    # --- the loop: Algorithm 1 -------------------------------------------------------------------------------------
    bar = tqdm(total=args.max_train_steps, initial=loop.step, desc="training", unit="step",
               disable=not accelerator.is_main_process)
    speed, bad = Throughput(), BadSteps(args.max_nonfinite_steps)
    resumed_at_end = loop.step >= args.max_train_steps
    uploads = Uploads(lambda pipe, grid, step: push_with_retries(pipe, args, grid, step), args.output_dir,
                      args.hub_model_id, resumable=bool(args.checkpointing_steps))  # the main process's
    saver = CheckpointSaver(accelerator, Path(args.output_dir), args.checkpoints_total_limit)

    def count(update: Update) -> None:
        """A finished update made a step, unless it was skipped: the learning-rate schedule, the EMA, the step
        count, the logs and what is due after the step (checkpoints, samples, ...)."""
        nonlocal interval_sums
        if bad.skip(update.finite(), update.overflow(), loop.step + 1):
            return
        lr_scheduler.step()
        decay = ema.update(accelerator.unwrap_model(model).parameters()) if ema else 0.0
        loop.step += 1
        interval_sums = update.loss_sums if interval_sums is None else interval_sums + update.loss_sums
        if due_after(args, loop.step).log:  # the means over the interval's updates, all their micro-batches
            logs = dict(loss_logs(accelerator, interval_sums, update.grad_norm),
                        **speed.interval(), lr=lr_scheduler.get_last_lr()[0], ema_decay=decay,
                        skipped_steps=bad.skipped, fp16_overflow_steps=bad.overflows)
            interval_sums = None
            accelerator.log(logs, step=loop.step)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_s']:.1f}",
                            data_wait=f"{100 * logs['data_wait']:.1f}%")
        bar.update(1)
        after_step(accelerator, args, model, ema, scheduler, loop.step, started,  # checkpoints, ...
                   saver, uploads, bpd_images)

    pending = None  # an update the device decided, counted when the next one has been queued (see Update)
    update_sums = interval_sums = None  # the losses of this update's micro-batches, of the logging interval's updates
    try:
        while loop.step < args.max_train_steps:
            waiting = time.perf_counter()
            x0 = to_model_range(stream.next_batch().to(device, non_blocking=True))  # x_0 ~ q(x_0), in [−1, 1]
            speed.waited(time.perf_counter() - waiting, len(x0) * world)
            with accelerator.accumulate(model):
                t, noise = loop.draw(x0, num_train_timesteps)  # t ~ Uniform({1, ..., T}), ε ~ N(0, I)
                x_t = scheduler.add_noise(x0, noise, t)  # eq. 4
                per_example = loss_fn(model(x_t, t).sample, x0, x_t, t, noise)  # eq. 14 (or the bound)
                loss = per_example.mean()
                sums = loss_sums(per_example.detach(), t, num_train_timesteps)
                update_sums = sums if update_sums is None else update_sums + sums
                accelerator.backward(loss)
                if pending is not None and accelerator.sync_gradients:  # before this update: its lr, its EMA decay
                    count(pending)
                    pending = None
                update = optimizer_step(accelerator, model, optimizer, loss, args.max_grad_norm)
            if not accelerator.sync_gradients:
                continue
            update.loss_sums, update_sums = update_sums, None
            if update.decided_on_device and not count_at_once(args, loop.step + 1):
                pending = update  # the host goes on queueing the next step instead of waiting for this one
            else:
                count(update)
    except Exception as err:  # samples and estimates that do not fit are skipped (see write_outputs)
        if not is_out_of_memory(err):
            raise
        failed_step = loop.step + 1 + (pending is not None)  # a pending update's step had finished
        raise out_of_memory(err, args, accelerator, f"training step {failed_step}", images, shape) from err
    finally:
        stream.close()
        if sys.exc_info()[1] is not None:  # the run stops: a checkpoint's upload still running goes with it
            uploads.abandon(sys.exc_info()[1])
    bar.close()
    logger.info("process %d: %s; %d updates skipped as non-finite, %d fp16 overflow steps",
                accelerator.process_index, speed.summary(), bad.skipped, bad.overflows)
    if resumed_at_end and accelerator.is_main_process:
        # The launch that wrote the last checkpoint was stopped before its pipeline or upload was done: redo them
        # (the pipeline/ folder of a run from ddpm_hf < 0.2 gives way to the pipeline in --output_dir).
        write_outputs(accelerator, model, ema, scheduler, args, loop.step, False, False,
                      args.push_to_hub, True, uploads)
    finish(accelerator, args, stream)
    if accelerator.is_main_process:
        uploads.finish()  # the others are done: none waits for the Hub


FUSED_ADAMW_ON = {"cuda"}  # devices where AdamW runs as one kernel (and skips a non-finite update on the device)


def make_optimizer(args, model, device):
    """AdamW (fused into one kernel on a GPU) and its learning-rate schedule, stepped by hand once per optimizer step
    (not prepared: accelerate would step it once per process)."""
    fused = {"fused": True} if device.type in FUSED_ADAMW_ON else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **fused)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps, num_cycles=args.lr_num_cycles,
                                 power=args.lr_power)
    return optimizer, lr_scheduler


def take_the_flags_optimizer_settings(args, optimizer, lr_scheduler, say: bool = True) -> None:
    """The optimiser's flags may change when a run resumes (the README says so): loading the checkpoint put back its
    own rate, betas, weight decay and ε, and they would have gone on, silently, while training_config.json and the
    card said the flags'. The rate is the schedule's base rate; the group's is the flags' schedule's value at the
    resumed step (the checkpoint's schedule's until its next step, where only the schedule's flags changed), as
    LambdaLR computes it: unchanged flags, the same float. ``say``: the changes are said (by one process)."""
    group = optimizer.param_groups[0]
    had = {"learning_rate": lr_scheduler.base_lrs[0], "adam_beta1": group["betas"][0], "adam_beta2": group["betas"][1],
           "adam_weight_decay": group["weight_decay"], "adam_epsilon": group["eps"]}
    changed = {name: value for name, value in had.items() if getattr(args, name) != value}
    if changed and say:
        logger.warning("resuming with the flags' optimiser settings, not the checkpoint's: %s",
                       ", ".join(f"--{name} {getattr(args, name)} (checkpoint: {value})"
                                 for name, value in changed.items()))
    lr_scheduler.base_lrs = [args.learning_rate] * len(optimizer.param_groups)
    rate = args.learning_rate * lr_scheduler.lr_lambdas[0](lr_scheduler.last_epoch)
    if rate != group["lr"] and not changed and say:
        logger.warning("resuming with the flags' learning-rate schedule: %g at step %d (the checkpoint's schedule: %g)",
                       rate, lr_scheduler.last_epoch, group["lr"])
    for group, lr_lambda in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
        group.update(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                     eps=args.adam_epsilon, initial_lr=args.learning_rate,
                     lr=args.learning_rate * lr_lambda(lr_scheduler.last_epoch))
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def keep_the_checkpoints_ema(args, ema) -> None:
    """A resumed run averages as its checkpoint did (its decay, warm-up, ramp and count go on together): flags that
    say otherwise are said, and made the checkpoint's, so that training_config.json, the trackers and the card say
    what the run does."""
    ramp = ema.power_ramp or [None, None]
    kept = {"ema_max_decay": ema.max_decay, "ema_warmup": ema.warmup, "ema_inv_gamma": ramp[0], "ema_power": ramp[1]}
    changed = {name: value for name, value in kept.items() if getattr(args, name) != value}
    if changed:
        logger.warning("resuming with the checkpoint's EMA settings, not the flags': %s",
                       ", ".join(f"--{name} {value} (flag: {getattr(args, name)})" for name, value in changed.items()))
        for name, value in changed.items():
            setattr(args, name, value)


def start_run(accelerator, args, model, stream, loop, ema, new_run: bool) -> float:
    """Finish what a crash left half done in --output_dir, clear an earlier run for a ``new_run`` with
    --overwrite_output_dir, resume when asked, write run_info.json, start the trackers. Returns the start time of
    --max_train_minutes."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        recover_folders(output_dir)
        if args.overwrite_output_dir and new_run:  # (see refuse_an_earlier_run)
            clear_earlier_run(output_dir, output_dir / args.logging_dir)
    accelerator.wait_for_everyone()
    if args.resume_from_checkpoint:
        path = resume(accelerator, output_dir, args.resume_from_checkpoint)
        if stream.legacy_noise_state is not None:  # (every process: the same state, the same answer)
            try:
                loop.load_noise_state(stream.legacy_noise_state)
            except ResumeMismatch as err:
                raise SystemExit(f"cannot resume from {path}: {err}") from err
        if path is not None:
            logger.info("resumed from %s at step %d", path, loop.step)
        if path is not None and ema is not None:
            keep_the_checkpoints_ema(args, ema)
        if loop.step > args.max_train_steps:  # its pipeline and card would say --max_train_steps
            raise SystemExit(f"{path} is at step {loop.step}, past --max_train_steps {args.max_train_steps}: pass "
                             f"--max_train_steps {loop.step} or more to continue that run (at {loop.step} it trains "
                             "nothing more and writes its pipeline), or start a new run in another --output_dir.")
        if path is not None and accelerator.is_main_process:  # (before this run's first checkpoint, which waits)
            set_aside_later_checkpoints(output_dir, path, loop.step)
        # accelerate counts micro-batches, restored from the checkpoint: under another --gradient_accumulation_steps
        # the first update would come after a remainder of them (scaled as a full one)
        accelerator.step = loop.step * args.gradient_accumulation_steps
    streams = args.data_streams
    global_batch = args.train_batch_size * streams * args.gradient_accumulation_steps  # the examples of one update
    if accelerator.is_main_process:
        info = {"distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
                "backend": getattr(accelerator.state, "backend", None), "model_wrapper": type(model).__name__,
                "data_streams": streams, "global_batch_size": global_batch, "dataset_shards": stream.num_shards,
                "dataset_revision": stream.revision,
                "pretrained_model": pretrained_hub_id(args),
                "pretrained_revision": args.revision if pretrained_hub_id(args) else None,
                "dataloader_num_workers": stream.num_workers}
        (output_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        tracker_config = {k: v for k, v in public_config(args).items() if isinstance(v, (int, float, str, bool))}
        # resumed: TensorBoard drops what the stopped launch logged after its checkpoint, logged again from here
        purge = {"tensorboard": {"purge_step": loop.step + 1}} if loop.step else None
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config, init_kwargs=purge)
        # (a run that starts: a resumed one keeps its checkpoint's EMA settings, whatever the flags say now)
        initial = args.ema_max_decay ** args.max_train_steps if args.use_ema and not loop.step else 0.0
        if initial > 0.05 and not args.ema_warmup and args.ema_inv_gamma is None:  # (the pipeline's weights)
            logger.warning("the EMA decay %s, constant from the first step (as the paper's 0.9999 over 800,000 "
                           "steps), leaves %.0f %% of "
                           "the initial weights in the EMA weights after %d steps, and the saved pipeline has those: "
                           "pass --ema_warmup for a run this short (or --no-use_ema).", args.ema_max_decay,
                           100 * initial, args.max_train_steps)
        if args.lr_scheduler != "constant" and loop.step < args.lr_warmup_steps >= args.max_train_steps:
            logger.warning("--lr_warmup_steps %d%s is not below --max_train_steps %d: the learning rate rises for the "
                           "whole run and never reaches --learning_rate %g (its last update's: %.3g). Pass a "
                           "shorter --lr_warmup_steps, such as a tenth of the run's steps.", args.lr_warmup_steps,
                           f" (--preset {args.preset}'s)" if args.warmup_from_preset else "", args.max_train_steps,
                           args.learning_rate,  # (update k, from 1, is at the warm-up's (k − 1) / --lr_warmup_steps)
                           args.learning_rate * (args.max_train_steps - 1) / args.lr_warmup_steps)
        if args.batch_from_preset and streams > 1:  # the preset's batch is its recipe's global one
            logger.warning("--preset %s's batch, %d, is per data stream: %d streams make %d examples per step, %d "
                           "times the recipe's (its learning rate and steps assume %d). For the recipe's batch pass "
                           "--train_batch_size %d.", args.preset, args.train_batch_size, streams,
                           args.train_batch_size * streams, streams, args.train_batch_size,
                           max(1, args.train_batch_size // streams))
    logger.info("process %d/%d, %s, data streams %s, %d decoding workers, %d examples per update in all (--train_batch_"
                "size %d × %d streams × %d accumulated)", accelerator.process_index, accelerator.num_processes,
                accelerator.distributed_type, stream.streams, stream.num_workers, global_batch, args.train_batch_size,
                streams, args.gradient_accumulation_steps)
    return time.perf_counter()


class BadSteps:
    """Counts the updates that did not happen: non-finite ones (skipped by every process; too many in a row stop
    the run) and fp16 overflows (the loss scaler skipped them and lowered its scale)."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.skipped, self.overflows, self.in_a_row = max_in_a_row, 0, 0, 0

    def skip(self, finite: bool, overflow: bool, step: int) -> bool:
        if overflow:
            self.overflows += 1
            return True
        if finite:
            self.in_a_row = 0
            return False
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        logger.warning("non-finite loss or gradient at step %d: update skipped (%d in a row, %d in all)", step,
                       self.in_a_row, self.skipped)
        if self.in_a_row >= self.max_in_a_row:
            raise SystemExit(f"{self.in_a_row} non-finite losses in a row at step {step}: lower --learning_rate, "
                             "check the data or use --mixed_precision no; the last checkpoint is intact.")
        return True


class Due(NamedTuple):
    """What happens after an optimizer step besides the update: the same answer on every process."""
    log: bool
    checkpoint: bool
    images: bool
    eval: bool
    push: bool
    final: bool


def due_after(args, step: int) -> Due:
    """What is due after optimizer step ``step`` (logs, a checkpoint, samples, a bits/dim estimate, an upload, the
    end); --max_train_minutes, checked after every logged step, can make it the final one (see :func:`after_step`)."""
    final = step == args.max_train_steps

    def every(n: Optional[int]) -> bool:
        return bool(n) and step % n == 0

    return Due(log=every(args.logging_steps) or final,
               checkpoint=every(args.checkpointing_steps) or (bool(args.checkpointing_steps) and final),
               images=every(args.save_images_steps), eval=every(args.eval_steps),
               push=bool(args.push_to_hub) and (final or (args.push_checkpoints and every(args.checkpointing_steps))),
               final=final)


def count_at_once(args, step: int) -> bool:
    """Whether the update of optimizer step ``step`` is counted before the next step is queued, even where the device
    decided it: when anything is due after it (the logged steps among them, where --max_train_minutes is checked)."""
    return any(due_after(args, step))


def after_step(accelerator, args, model, ema, scheduler, step: int, started: float, saver: CheckpointSaver,
               uploads: Uploads, bpd_images: Optional[torch.Tensor]) -> None:
    """The time budget, then what is due after optimizer step ``step``: a checkpoint (every process), samples, a
    bits/dim estimate, the final pipeline, an upload (the main process). The budget is checked at the logged steps,
    where the host waits for the step anyway (at the others it queues the next step meanwhile: see Update)."""
    saver.raise_if_failed()  # a checkpoint published in the background could not be written
    due = due_after(args, step)
    if args.max_train_minutes and due.log and out_of_time(accelerator, started, args.max_train_minutes):
        logger.info("time budget of %s minutes reached at step %d", args.max_train_minutes, step)
        args.max_train_steps = step
        due = due_after(args, step)
    if due.checkpoint:
        def host_pipeline():  # the checkpoint's EMA pipeline, copied on the host: no room taken from training's GPU
            host = torch.device("cpu")
            unet = accelerator.unwrap_model(model)
            return unless_out_of_memory(host, f"checkpoint-{step}/pipeline", "the checkpoint itself is written",
                                        lambda: ema_pipeline(unet, ema, scheduler.config, host))

        saver.save(step, host_pipeline)
    if due.images or due.eval or due.push or due.final:
        if accelerator.is_main_process:
            # a checkpoint's upload skipped (one still running) needs no grid, no copy, and no wait for its checkpoint
            push = due.push and (due.final or not uploads.busy(step))
            if push or due.final:  # after the checkpoint of the step, which a resume finishes them from
                saver.wait()
            try:
                write_outputs(accelerator, model, ema, scheduler, args, step, due.images, due.eval,
                              push, due.final, uploads, bpd_images)
            except Exception as err:  # the EMA network's copy or the pipeline's files (grids skip themselves)
                if not is_out_of_memory(err):
                    raise
                raise outputs_out_of_memory(err, args, accelerator.device, step) from err
        accelerator.wait_for_everyone()  # only then: a barrier every step would stall a GPU on the host


def finish(accelerator, args, stream) -> None:
    """The last example ids (--record_example_ids), the count of undecodable images, the trackers closed, where
    everything is."""
    output_dir, rank = Path(args.output_dir), accelerator.process_index
    stream.write_ids()
    if stream.skipped_rows:
        logger.warning("process %d skipped %d undecodable images", rank, stream.skipped_rows)
    accelerator.end_training()
    if accelerator.is_main_process:
        checkpoints = f"{output_dir}/checkpoint-*" if any(output_dir.glob("checkpoint-*")) else "none"
        logs = output_dir / args.logging_dir
        print(f"pipeline: {output_dir}\nsamples: {output_dir / 'samples'}\n"
              f"checkpoints: {checkpoints}\nlogs: {logs if logs.is_dir() else 'none written there'}")


def loss_sums(losses, t, num_train_timesteps: int):
    """The sums a logging interval's means are made of, for one micro-batch's per-example ``losses`` at timesteps
    ``t``: one tensor on their device, [the sums of the losses per quarter of t, the counts per quarter], made in one
    index_add_ (it runs at every micro-batch). Nothing is read on the host: on a GPU each read waits for the device
    (torch.bincount reads the largest value to size its output)."""
    losses = losses.float()
    quarter = t * 4 // num_train_timesteps  # t in [q T/4, (q + 1) T/4): quarter q
    return torch.zeros(8, device=losses.device).index_add_(0, torch.cat([quarter, quarter + 4]),
                                                             torch.cat([losses, torch.ones_like(losses)]))


def loss_logs(accelerator, sums, grad_norm=None) -> dict:
    """The mean loss over every process's examples of the logging interval (its updates, their micro-batches; sums
    of :func:`loss_sums`), per quarter of the timesteps (the loss varies with t by orders of magnitude: the quarters
    show where training stands), and the last update's gradient norm (0 where none was computed): one read back
    from the device. (A step's loss alone, logged every --logging_steps, was one micro-batch of one step.)"""
    norm = torch.zeros(1, device=sums.device) if grad_norm is None else (
        torch.as_tensor(grad_norm, device=sums.device).detach().float().reshape(1))
    *quarters, norm = torch.cat([accelerator.reduce(sums, "sum"), norm]).tolist()
    logs = {"loss": sum(quarters[:4]) / sum(quarters[4:]), "grad_norm": norm}
    logs.update({f"loss_q{q}": total / count for q, (total, count) in enumerate(zip(quarters[:4], quarters[4:]))
                 if count})
    return logs


def out_of_time(accelerator, started: float, minutes: float) -> bool:
    """Whether any process has used up --max_train_minutes: every process must stop at the same step (one process
    asks nobody, and so waits for no device)."""
    late = float(time.perf_counter() - started > 60 * minutes)
    if accelerator.num_processes == 1:
        return bool(late)
    return accelerator.reduce(torch.tensor([late], device=accelerator.device), "sum").item() > 0


if __name__ == "__main__":
    sys.exit(main())
