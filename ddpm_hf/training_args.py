"""The flags of training/train.py: parsed, completed from the preset, and checked (range and combination) before
anything is loaded; a bad flag exits with status 2 and names itself. Flags are named like diffusers'
train_unconditional.py where the meaning is the same."""

import argparse
import json
import os
from pathlib import Path

import torch
from accelerate.utils import LoggerType

from .data import EMBEDDED_NAME
from .hub import is_repo_id, unknown_config_keys
from .losses import LOSSES, check_loss_supports_variance, check_snr_gamma
from .presets import PRESETS, RECIPES, training_defaults
from .processes import DDP_TIMEOUT_S, ArgumentParser
from .scheduler import BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES
from .seeds import SEED_RANGE
from .unet import DDPMUNet

TRACKERS = [t.value for t in LoggerType] + ["none"]  # what accelerate can log to, or nothing
DESCRIPTION = """Train a DDPM (Ho, Jain & Abbeel 2020) with 🤗 Accelerate on any 🤗 datasets image dataset:
    accelerate launch training/train.py --preset small-28 --dataset_name embedded:fashion_mnist --output_dir runs/x
A preset supplies the network and the paper's hyper-parameters; any flag overrides it. Training is step-based."""


def parse_args(argv=None):
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=None,
                      help=f"Hub dataset, local folder (parquet/arrow/tar or image files), or {EMBEDDED_NAME} "
                           "(default when --train_data_dir is not given)")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="a local folder: its parquet/arrow/tar files, else its "
                      "image files (imagefolder)")
    data.add_argument("--split", default="train")
    data.add_argument("--dataset_revision", default=None, help="a Hub dataset's branch, tag or commit (default: "
                      "main, resolved to its commit at the start and kept in the checkpoints; a resume: the commit its "
                      "checkpoints read)")
    data.add_argument("--image_column", default=None, help="default: the first Image column")
    data.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True)
    data.add_argument("--shuffle_buffer_size", type=int, default=1000)
    data.add_argument("--resolution", type=int, default=None,
                      help="default: the model's sample_size (diffusers' example: 64)")
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                      help="crop the centre of each image to --resolution (default: on; diffusers' example crops at "
                           "random unless --center_crop)")
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None,
                      help="flip half the images left-right (default: the preset's: on for ddpm-cifar10 and "
                           "ddpm-256, as the paper; diffusers' example: off)")
    data.add_argument("--cache_dir", default=None,
                      help="the downloads' cache: a --pretrained_model_name_or_path from the Hub, and datasets' (with "
                           "--no-streaming the downloaded data, streaming only its metadata: a streamed Hub dataset "
                           "is read again each epoch; diffusers' example downloads)")
    data.add_argument("--dataloader_num_workers", type=int, default=None,
                      help="processes that decode and augment images for each training process (0: a background "
                           "thread of the training process does it); default: the free cores, at most 8")
    data.add_argument("--data_streams", type=int, default=None,
                      help="split the data into this many streams (default: one per process); runs with the same "
                           "value train on the same global batches whatever the number of processes")

    model = p.add_argument_group("model and diffusion")
    model.add_argument("--preset", default="small-28", choices=sorted(PRESETS))
    model.add_argument("--model_config", default=None, help="a UNet2DModel-style config.json, overrides --preset")
    model.add_argument("--pretrained_model_name_or_path", default=None,
                       help="start from the U-Net of a pipeline folder or Hub repo (a training run's --output_dir, "
                            "google/ddpm-cifar10-32, ...): its config and weights, which override --preset; the "
                            "diffusion and the recipe still come from the flags (diffusers' examples' name)")
    model.add_argument("--revision", default=None,
                       help="the branch, tag or commit of --pretrained_model_name_or_path on the Hub (default: main, "
                            "resolved to its commit at the start and recorded in training_config.json)")
    model.add_argument("--allow_pickle", action="store_true",
                       help="read pickle weights (diffusion_pytorch_model.bin) of --pretrained_model_name_or_path, as "
                            "the google/ddpm-* repos hold, with torch.load(weights_only=True): only from a source you "
                            "trust")
    model.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                       help="training settings laid over the preset's before any flag: 'paper' (the paper's) or "
                            "'short' (measured for runs of minutes to hours: " +
                            ", ".join(f"--{k} {v:g}" for k, v in RECIPES["short"].items()) + ")")
    model.add_argument("--dropout", type=float, default=None)
    model.add_argument("--original_init", action="store_true", help="the original code's initialisation")
    model.add_argument("--ddpm_num_steps", type=int, default=1000)
    model.add_argument("--ddpm_beta_schedule", default="linear", choices=BETA_SCHEDULES)
    model.add_argument("--variance_type", default=None, choices=VARIANCE_TYPES)
    model.add_argument("--prediction_type", default="epsilon", choices=PREDICTION_TYPES,
                       help="what the network predicts; 'sample' (x_0) is trained on the plain x_0 error, where "
                            "diffusers' example weights it by SNR(t) (the ε loss's weighting: --snr_gamma inf here)")
    model.add_argument("--loss", default="simple", choices=LOSSES)
    model.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR-γ loss weighting (Hang et al. 2023, who recommend 5): each example's x_0 error "
                            "weighted by min(SNR(t), γ), for ε, x_0 or v prediction; with --loss hybrid its L_simple "
                            "part only (default: none, the paper's L_simple)")
    model.add_argument("--ddpm_num_inference_steps", type=int, default=None,
                       help="steps of the sample grids' reverse chain (default: --ddpm_num_steps)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max_train_steps", type=int, default=None)
    opt.add_argument("--max_train_minutes", type=float, default=None,
                     help="also stop after this much training time, checked at each logged step (--logging_steps); all "
                          "processes stop at the same step")
    opt.add_argument("--train_batch_size", type=int, default=None,
                     help="per process and per data stream; default: the preset's (the paper's 128 for CIFAR-10, 64 "
                          "at 256²; diffusers' example: 16)")
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1)
    opt.add_argument("--learning_rate", type=float, default=None,
                     help="default: the preset's (2e-4 for CIFAR-10, the paper's; diffusers' example: 1e-4)")
    opt.add_argument("--lr_scheduler", default="constant_with_warmup",  # diffusers' get_scheduler's names
                     choices=["constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts",
                              "polynomial"],
                     help="the paper's: constant_with_warmup (diffusers' example defaults to cosine); "
                          "cosine_with_restarts makes --lr_num_cycles cycles, polynomial decays to 1e-7 with power "
                          "--lr_power")
    opt.add_argument("--lr_num_cycles", type=int, default=None,
                     help="cosine_with_restarts' hard restarts (default: 1, as in diffusers' examples)")
    opt.add_argument("--lr_power", type=float, default=None,
                     help="polynomial's power (default: 1.0, a linear decay, as in diffusers' examples)")
    opt.add_argument("--lr_warmup_steps", type=int, default=None,
                     help="in optimizer updates, whatever the processes and --gradient_accumulation_steps (diffusers' "
                          "example's count is × accumulation / processes updates); default: the preset's (the "
                          "paper's 5000; diffusers' example: 500)")
    opt.add_argument("--adam_beta1", type=float, default=0.9, help="(default: %(default)s, the paper's and "
                     "torch's; diffusers' example: 0.95)")
    opt.add_argument("--adam_beta2", type=float, default=0.999)
    opt.add_argument("--adam_weight_decay", type=float, default=0.0,
                     help="(default: %(default)s, the paper's; diffusers' example: 1e-6)")
    opt.add_argument("--adam_epsilon", type=float, default=1e-8)
    opt.add_argument("--max_grad_norm", type=float, default=None)
    opt.add_argument("--max_nonfinite_steps", type=int, default=5,
                     help="skip updates with a NaN/Inf loss or gradient; stop after this many in a row")
    opt.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True,
                     help="average the weights (default: on, the paper's; diffusers' example: off): the pipeline is "
                          "saved with the average")
    opt.add_argument("--ema_max_decay", type=float, default=None, help="default: the preset's (the paper's 0.9999)")
    opt.add_argument("--ema_warmup", action="store_true",
                     help="ramp the EMA decay up, min(--ema_max_decay, (1 + n) / (10 + n)) after n updates, for "
                          "short runs (without it, or the ramp below, the paper's constant decay from the first "
                          "update)")
    opt.add_argument("--ema_inv_gamma", type=float, default=None,
                     help="diffusers' example's EMA ramp, min(--ema_max_decay, 1 - (1 + n / inv_gamma)^-power) after n "
                          "updates (its --use_ema's); either flag turns it on, the other at diffusers' default "
                          "(inv_gamma 1, power 0.75: 0.9999 after about 215k updates)")
    opt.add_argument("--ema_power", type=float, default=None, help="see --ema_inv_gamma")
    opt.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                     help="default: accelerate's setting (`accelerate launch --mixed_precision`, or `accelerate "
                          "config`'s under `accelerate launch`), else no; the one in force is logged and kept in "
                          "training_config.json (diffusers' example: no, whatever accelerate's setting)")
    opt.add_argument("--gradient_checkpointing", action="store_true")
    opt.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on Ampere+ GPUs")
    opt.add_argument("--compile", action="store_true", help="torch.compile the U-Net (checked before training)")
    opt.add_argument("--seed", type=int, default=0)

    out = p.add_argument_group("outputs")
    out.add_argument("--output_dir", default="ddpm-output")
    out.add_argument("--checkpointing_steps", type=int, default=500,
                     help="steps between checkpoints, 0: none (default: %(default)s)")
    out.add_argument("--checkpoints_total_limit", type=int, default=3,
                     help="the newest checkpoints kept, 0: all (default: %(default)s; diffusers' example keeps all)")
    out.add_argument("--resume_from_checkpoint", default=None,
                     help="'latest', a checkpoint folder, or a checkpoint-N folder's name in --output_dir")
    out.add_argument("--next_epoch_on_resume", action="store_true",
                     help="resume the model, optimiser, EMA and schedule exactly, and begin the data at the next "
                          "epoch's start: for a resume with another number of processes (--data_streams), another "
                          "--dataset_revision, --seed or --shuffle_buffer_size (the rest of the checkpoint's epoch is "
                          "not seen)")
    out.add_argument("--overwrite_output_dir", action="store_true",
                     help="start a new run in an --output_dir that holds an earlier run's checkpoints or final "
                          "pipeline, removing them (abandoned-after-checkpoint-N/ folders too), and that run's "
                          "samples/ and logs/ where run_info.json shows a run "
                          "of this script wrote them (without it such a run is refused: resume one with checkpoints "
                          "with --resume_from_checkpoint latest)")
    out.add_argument("--save_images_steps", type=int, default=0, help="0: only at the end")
    out.add_argument("--num_sample_images", type=int, default=16)
    out.add_argument("--eval_steps", type=int, default=0, help="bits/dim estimate every N steps (0: never)")
    out.add_argument("--eval_split", default="test", help="the split whose first 64 images --eval_steps evaluates")
    out.add_argument("--logger", "--report_to", dest="logger", default="tensorboard", choices=TRACKERS,
                     help="the accelerate tracker(s) to log to (--report_to: diffusers' name for this flag)")
    out.add_argument("--logging_steps", type=int, default=1, help="log (and read the loss back from the device) "
                     "every N steps, the loss's mean over them; above 1 keeps a GPU from waiting on the host")
    out.add_argument("--logging_dir", default="logs")
    out.add_argument("--tracker_project_name", default="ddpm_hf",
                     help="the trackers' project (wandb's, comet's; TensorBoard's run is --logging_dir)")
    out.add_argument("--ddp_timeout", type=float, default=DDP_TIMEOUT_S, help="seconds the processes wait for each "
                     "other (the others wait while the main one samples, estimates bits/dim, saves and uploads); "
                     "torch's default for NCCL is 600 (transformers' flag name)")
    out.add_argument("--record_example_ids", action="store_true",
                     help="write the sha1 of every training image per process, in order, to logs/example_ids_rankN.txt "
                          "(audits of the data split): over the whole run, a resume keeping the lines up to its "
                          "checkpoint (with another number of processes, started again); written at each checkpoint "
                          "and at the end, held in memory in between")
    hub = p.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", default=None, help="name or namespace/name (default: --output_dir's folder "
                     "name, in the token's account, as in diffusers' example)")
    hub.add_argument("--hub_token", default=None)
    hub.add_argument("--hub_private_repo", action="store_true")
    hub.add_argument("--push_checkpoints", action="store_true", help="also push the EMA pipeline at checkpoints")
    hub.add_argument("--hub_push_attempts", type=int, default=3, help="tries per upload (backoff 2 s, 4 s, ...)")
    hub.add_argument("--hub_timeout", type=float, default=120.0, help="seconds without progress before an upload "
                     "request is abandoned (and retried)")
    args, unknown = p.parse_known_args(argv)
    for token in unknown:
        flag = token.split("=", 1)[0]
        if flag in DIFFUSERS_ONLY_FLAGS:
            p.error(f"{flag} is a flag of diffusers' training examples, not of this script: "
                    f"{DIFFUSERS_ONLY_FLAGS[flag]}")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    check_args(p, args)
    return args


# The flags of diffusers' examples/unconditional_image_generation/train_unconditional.py (and of its other training
# examples) that this script does not take, with what does the same here: a command brought from there stops naming
# the replacement, not just the flag.
_NO_EPOCHS = ("training here is step-based (a streamed dataset has no length to count epochs by): pass "
              "--max_train_steps, or --max_train_minutes")
DIFFUSERS_ONLY_FLAGS = {
    "--num_epochs": _NO_EPOCHS,
    "--num_train_epochs": _NO_EPOCHS,
    "--validation_steps": "pass --save_images_steps (the sample grid) or --eval_steps (a bits/dim estimate)",
    "--save_images_epochs": "pass --save_images_steps",
    "--save_model_epochs": "the pipeline is written at the end and a resumable checkpoint every --checkpointing_steps",
    "--eval_batch_size": "the sample grid's size is --num_sample_images",
    "--model_config_name_or_path": "pass --model_config with a UNet2DModel config.json, or a --preset",
    "--local_rank": "drop it: accelerate launch gives each process its rank in the environment (LOCAL_RANK)",
    "--enable_xformers_memory_efficient_attention": "drop it: the attention runs PyTorch's scaled_dot_product_attention, "
                                                    "which picks a memory-efficient kernel itself",
    "--preserve_input_precision": "drop it: images are read at 8 bits, 16-bit ones scaled (v · 255 / 65535), as the "
                                  "paper's data are; the model's input is float32 in [-1, 1] whatever the source",
}


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Fill what the flags leave open from the preset, then check every flag's range and combination before anything
    is loaded: ``p.error`` names the flag and exits with status 2."""
    try:
        defaults = training_defaults(args.preset, args.recipe)
    except ValueError as err:
        p.error(str(err))
    args.batch_from_preset = args.train_batch_size is None  # per data stream: see train.py's start_run
    args.warmup_from_preset = args.lr_warmup_steps is None  # (named in train.py's warning of a run-long warm-up)
    if args.pretrained_model_name_or_path is not None:
        if args.model_config:
            p.error("--pretrained_model_name_or_path brings its U-Net's config: drop --model_config")
        if args.original_init:
            p.error("--original_init initialises the weights --pretrained_model_name_or_path brings: drop one")
    elif args.revision is not None or args.allow_pickle:
        p.error(f"{'--revision' if args.revision is not None else '--allow_pickle'} is about "
                "--pretrained_model_name_or_path, which is not given")
    # flags that the rest of the command turns off, refused rather than ignored (checked before the preset fills them)
    if not args.use_ema and (args.ema_warmup or args.ema_max_decay is not None):
        p.error(f"{'--ema_warmup' if args.ema_warmup else '--ema_max_decay'} sets the EMA, which --no-use_ema turns "
                "off: drop one of them")
    if args.lr_num_cycles is not None and args.lr_scheduler != "cosine_with_restarts":
        p.error(f"--lr_num_cycles is cosine_with_restarts' number of cycles; --lr_scheduler {args.lr_scheduler} has "
                "none: drop it, or pass --lr_scheduler cosine_with_restarts")
    if args.lr_power is not None and args.lr_scheduler != "polynomial":
        p.error(f"--lr_power is the polynomial schedule's power; --lr_scheduler {args.lr_scheduler} has none: drop "
                "it, or pass --lr_scheduler polynomial")
    args.lr_num_cycles = 1 if args.lr_num_cycles is None else args.lr_num_cycles
    args.lr_power = 1.0 if args.lr_power is None else args.lr_power
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.ddpm_num_inference_steps is None:
        args.ddpm_num_inference_steps = args.ddpm_num_steps
    if args.dataset_name is None and args.train_data_dir is None:
        args.dataset_name = EMBEDDED_NAME
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "ddpm_num_steps",
                 "ddpm_num_inference_steps", "num_sample_images", "max_nonfinite_steps", "hub_push_attempts", "logging_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("checkpointing_steps", "checkpoints_total_limit", "save_images_steps", "eval_steps",
                 "lr_warmup_steps", "shuffle_buffer_size"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.lr_num_cycles < 1:
        p.error(f"--lr_num_cycles must be at least 1, got {args.lr_num_cycles}")
    if not 0 < args.lr_power < float("inf"):
        p.error(f"--lr_power must be positive, got {args.lr_power}")
    if args.next_epoch_on_resume and not args.resume_from_checkpoint:
        p.error("--next_epoch_on_resume is about --resume_from_checkpoint, which is not given")
    if args.checkpointing_steps == 0 and args.push_checkpoints:
        p.error("--push_checkpoints pushes the pipeline at each checkpoint, which --checkpointing_steps 0 turns off: "
                "drop one of them")
    if args.seed not in SEED_RANGE:
        p.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        p.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        p.error("--mixed_precision fp16 needs a CUDA GPU (its loss scaler is CUDA-only); on CPU use bf16 or no")
    if args.data_streams is not None and args.data_streams < 1:
        p.error(f"--data_streams must be at least 1, got {args.data_streams}")
    for name in ("max_grad_norm", "adam_epsilon", "hub_timeout", "ddp_timeout") + (("max_train_minutes",) if args.max_train_minutes
                                                                    is not None else ()):
        if not getattr(args, name) > 0:  # also refuses NaN
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0 < args.learning_rate < 1:
        p.error(f"--learning_rate must be in (0, 1), got {args.learning_rate}")
    if args.lr_scheduler == "polynomial":  # diffusers' decays from the rate to 1e-7 over the steps after the warm-up
        if args.lr_warmup_steps >= args.max_train_steps:
            p.error(f"--lr_scheduler polynomial decays over the steps after the warm-up: --lr_warmup_steps "
                    f"{args.lr_warmup_steps} leaves none of --max_train_steps {args.max_train_steps}; warm up for "
                    "fewer steps, or use another --lr_scheduler")
        if args.learning_rate <= 1e-7:
            p.error(f"--lr_scheduler polynomial decays to 1e-7: --learning_rate {args.learning_rate} must be above it")
    for name in ("ema_inv_gamma", "ema_power"):
        value = getattr(args, name)
        if value is not None and not (0 < value < float("inf")):
            p.error(f"--{name} must be positive, got {value}")
    if args.ema_inv_gamma is not None or args.ema_power is not None:  # the ramp, the other at diffusers' default
        args.ema_inv_gamma = 1.0 if args.ema_inv_gamma is None else args.ema_inv_gamma
        args.ema_power = 0.75 if args.ema_power is None else args.ema_power
    if args.ema_inv_gamma is not None and args.ema_warmup:
        p.error("--ema_warmup and --ema_inv_gamma/--ema_power are two ramps of the EMA decay: choose one")
    if args.ema_inv_gamma is not None and not args.use_ema:
        p.error("--ema_inv_gamma/--ema_power ramp the EMA, which --no-use_ema turns off: drop one of them")
    for name in ("adam_beta1", "adam_beta2", "ema_max_decay", "dropout", "adam_weight_decay"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            p.error(f"--{name} must be in [0, 1), got {value}")
    if args.ddpm_num_inference_steps > args.ddpm_num_steps:
        p.error("--ddpm_num_inference_steps cannot exceed --ddpm_num_steps")
    if args.resolution is not None and args.resolution < 1:
        p.error(f"--resolution must be at least 1, got {args.resolution}")
    if args.push_to_hub and not args.hub_model_id:  # diffusers' example: the repo is named after --output_dir
        args.hub_model_id = Path(os.path.abspath(args.output_dir)).name  # ("." or a trailing "/" too; no symlink)
        if not is_repo_id(args.hub_model_id):
            p.error(f"--push_to_hub without --hub_model_id names the repo after --output_dir, but "
                    f"{args.hub_model_id!r} is not a Hub repo name: pass --hub_model_id (name or namespace/name)")
    if args.hub_model_id is not None and not is_repo_id(args.hub_model_id):
        p.error(f"--hub_model_id {args.hub_model_id!r} is not a Hub repo id: use name or namespace/name with letters, "
                "digits, '.', '_' or '-'")
    try:
        check_loss_supports_variance(args.loss, args.variance_type)
        check_snr_gamma(args.snr_gamma, args.prediction_type, args.loss)
    except ValueError as err:
        p.error(str(err))
    missing_tracker = tracker_not_installed(args.logger)
    if missing_tracker:
        p.error(missing_tracker)
    if args.push_checkpoints and not args.push_to_hub:
        p.error("--push_checkpoints needs --push_to_hub")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output_dir {args.output_dir} is a file, not a folder")
    # the folder is made when the run starts: here, where it would be made (its nearest existing parent) is checked
    existing = next(folder for folder in (Path(args.output_dir).absolute(), *Path(args.output_dir).absolute().parents)
                    if os.path.exists(folder))
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        p.error(f"--output_dir {args.output_dir} cannot be made or written: {existing} is "
                f"{'a file' if not os.path.isdir(existing) else 'a folder this user cannot write in'}")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        p.error(f"--train_data_dir {args.train_data_dir} is not a folder")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        named = os.path.join(args.output_dir, os.path.basename(os.path.normpath(args.resume_from_checkpoint)))
        if not os.path.isdir(named):  # (diffusers' example takes the name of a checkpoint in --output_dir)
            p.error(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder, here or in "
                    f"--output_dir {args.output_dir} (or use 'latest')")
        args.resume_from_checkpoint = named
    if args.resume_from_checkpoint not in (None, "latest"):  # a run's folder or a pipeline, passed for a checkpoint
        folder = Path(args.resume_from_checkpoint)
        if any(folder.glob("checkpoint-*")):
            p.error(f"--resume_from_checkpoint {folder} is a run's --output_dir, not a checkpoint: pass "
                    f"--output_dir {folder} --resume_from_checkpoint latest, or one of its checkpoint-N folders")
        if (folder / "model_index.json").is_file():
            p.error(f"--resume_from_checkpoint {folder} is a pipeline folder, not a checkpoint (which holds the "
                    "optimizer's and the data's state too): pass the checkpoint-N folder, or start a new run from its "
                    f"weights with --pretrained_model_name_or_path {folder}")

    if args.model_config:
        try:
            read_model_config(args.model_config)
        except ValueError as err:
            p.error(str(err))


def tracker_not_installed(logger_name: str):
    """Why --logger cannot log (its package is missing), or None. accelerate itself would drop such a tracker with a
    debug message only, and the run would log nothing."""
    from accelerate.tracking import get_available_trackers

    if logger_name in ("none", "all") or LoggerType(logger_name) in get_available_trackers():
        return None
    # every tracker's pip package is named like the tracker (comet_ml: pip normalises it to comet-ml)
    return (f"--logger/--report_to {logger_name}: the {logger_name} package is not installed; pip install "
            f"{logger_name}, or choose --logger tensorboard (installed with ddpm_hf) or none")


def read_model_config(path: str) -> dict:
    """A UNet2DModel-style config.json as a dict, checked for unknown keys (a typo would silently fall back to the
    default) and missing files or bad JSON, each named. A folder is read as diffusers' --model_config_name_or_path
    reads one: its config.json (a U-Net's folder), else its unet/config.json (a pipeline's)."""
    if os.path.isdir(path):
        inside = [os.path.join(path, name) for name in ("config.json", os.path.join("unet", "config.json"))]
        if not any(os.path.isfile(file) for file in inside):
            raise ValueError(f"--model_config {path} is a folder without config.json or unet/config.json")
        path = next(file for file in inside if os.path.isfile(file))
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


def public_config(args) -> dict:
    """The run's flags without the token: what goes to the trackers and training_config.json."""
    return {k: v for k, v in vars(args).items() if k not in ("hub_token", "batch_from_preset", "warmup_from_preset")}


LOCAL_PATH_FLAGS = ("output_dir", "train_data_dir", "cache_dir", "logging_dir", "resume_from_checkpoint",
                    "model_config")


def card_config(args) -> dict:
    """:func:`public_config` without this machine's paths, for a published model card: the folders and files are
    left out, and a local --dataset_name is named by its folder's name only."""
    config = {k: v for k, v in public_config(args).items() if k not in LOCAL_PATH_FLAGS}
    for name in ("dataset_name", "pretrained_model_name_or_path"):
        if config.get(name) and os.path.exists(config[name]):
            config[name] = f"local folder {os.path.basename(os.path.normpath(config[name]))}"
    return config
