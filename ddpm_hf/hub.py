"""Loading pipeline folders and Hub repos into ddpm_hf's classes, safely.

diffusers' own loader refuses a Hub repo whose components live in a third-party package and falls back to random
weights for missing keys with only a warning; this loader reads every layout ddpm_hf writes plus diffusers' DDPM
folders, always builds :class:`ddpm_hf.DDPMUNet` and :class:`ddpm_hf.DDPMScheduler`, and fails with an error that
names the file at fault.
"""

import contextlib
import inspect
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import http_status, local_path_hint
from .scheduler import DDPMScheduler
from .unet import DDPMUNet

logger = logging.getLogger(__name__)
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def is_repo_id(name: str) -> bool:
    """A Hub repo id: ``name`` or ``namespace/name`` of letters, digits, ``.``, ``_``, ``-``; no ``..``, no path."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def resolve_folder(
    name_or_path: Union[str, os.PathLike],
    revision: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
    force_download: bool = False,
    components: Sequence[str] = ("unet", "scheduler"),
) -> Path:
    """A local pipeline folder, or the snapshot of a Hub repo (only the files the named ``components`` need are
    downloaded; again, with ``force_download``, where they are in the cache)."""
    name = str(name_or_path)
    if not name.strip():
        raise ValueError("the pipeline name is empty: pass a folder or a Hub repo id ('namespace/name').")
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # "~user/..." for a user that does not exist here
        path = Path(name)
    if path.is_dir():
        if not (path / "model_index.json").exists() and (path / "pipeline" / "model_index.json").is_file():
            return path / "pipeline"  # the --output_dir of a training run of ddpm_hf < 0.2
        return path
    if not is_repo_id(name):
        raise ValueError(f"{name!r} is neither an existing folder nor a valid Hub repo id ('namespace/name' of "
                         "letters, digits, '.', '_' and '-').")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*.py"]
    if "unet" in components:
        patterns += ["unet/config.json", f"unet/{SAFE_WEIGHTS}"] + ([f"unet/{PICKLE_WEIGHTS}"] if allow_pickle else [])
    if "scheduler" in components:
        patterns += ["scheduler/scheduler_config.json", "scheduler/*.py"]
    try:
        return Path(snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only, allow_patterns=patterns,
                                      force_download=force_download))
    except Exception as err:  # HTTP errors, timeouts, offline mode, missing repo: one message naming the repo
        from huggingface_hub import constants

        message = redact(f"{type(err).__name__}: {err}", [token])
        offline = ("HF_HUB_OFFLINE is set: only a repo downloaded before loads (unset it to download)"
                   if constants.HF_HUB_OFFLINE else "a repo downloaded before loads offline with HF_HUB_OFFLINE=1 "
                   "(Python: local_files_only=True)")
        raise OSError(f"could not get {name} (revision {revision or 'main'}) from {constants.ENDPOINT}: {message}\n"
                      f"Check the repo id, your access to it and the connection; {offline}.{local_path_hint(name)}"
                      ) from err


def _read_json(path: Path) -> dict:
    if not path.is_file():
        from .checkpoints import checkpoints

        pipelines = [folder / "pipeline" for folder in checkpoints(path.parent)
                     if (folder / "pipeline" / "model_index.json").is_file()]
        unfinished = (f" It is a training run's folder before its end: its newest checkpoint's pipeline is "
                      f"{pipelines[-1]}." if path.name == "model_index.json" and pipelines else "")
        raise FileNotFoundError(f"missing {path}: not a complete pipeline folder (expected model_index.json, "
                                "unet/config.json, unet/diffusion_pytorch_model.safetensors, "
                                f"scheduler/scheduler_config.json).{unfinished}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt or truncated.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def unknown_config_keys(config: dict, cls) -> list:
    """The keys of ``config`` that ``cls.__init__`` does not take (``_``-prefixed metadata aside), sorted."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return sorted(k for k in config if not k.startswith("_") and k not in known)


def redact(text: str, secrets) -> str:
    """``text`` with every (non-empty) secret replaced by ***, for logs and error messages."""
    for secret in secrets:
        if isinstance(secret, str) and secret:
            text = text.replace(secret, "***")
    return text


def _warn_unknown_keys(path: Path, config: dict, cls) -> None:
    """Keys the class does not take are ignored, as diffusers does (a newer diffusers may add keys), but named: a
    misspelt key would otherwise silently leave its default in place."""
    unknown = unknown_config_keys(config, cls)
    if unknown:
        logger.warning("%s: ignoring keys that %s does not take: %s", path, cls.__name__, unknown)


def _load_unet(folder: Path, allow_pickle: bool, torch_dtype: Optional[torch.dtype],
               safetensors_only: bool = False) -> DDPMUNet:
    unet_dir = folder / "unet"
    _warn_unknown_keys(unet_dir / "config.json", _read_json(unet_dir / "config.json"), DDPMUNet)
    safe, pickle_file = unet_dir / SAFE_WEIGHTS, unet_dir / PICKLE_WEIGHTS
    if not safe.is_file() and safetensors_only:
        raise FileNotFoundError(f"missing {safe}: the folder has no U-Net weights in safetensors, which "
                                "use_safetensors=True asks for.")
    if not safe.is_file():
        if pickle_file.is_file() and not allow_pickle:
            raise ValueError(f"{pickle_file} is a pickle file, which can run arbitrary code when loaded, and there is no "
                             f"{SAFE_WEIGHTS}. Pass allow_pickle=True only if you trust its source.")
        if not pickle_file.is_file():
            raise FileNotFoundError(f"missing {safe}: the folder has no U-Net weights" + ("." if allow_pickle else
                                    f" in safetensors (pickle weights, {PICKLE_WEIGHTS}, as older diffusers repos hold "
                                    "them, are looked for only with allow_pickle=True; --allow_pickle in training)."))
    weights = safe if safe.is_file() else pickle_file
    try:
        unet, info = DDPMUNet.from_pretrained(unet_dir, use_safetensors=weights == safe, torch_dtype=torch_dtype,
                                              output_loading_info=True, low_cpu_mem_usage=False)
    except ValueError as err:  # our config validation names the config; anything else is about the weights
        source = unet_dir / "config.json" if str(err).startswith("DDPMUNet:") else weights
        raise ValueError(f"could not load {source}: {err}") from err
    except Exception as err:  # safetensors/torch raise several types for truncated or corrupt files
        raise ValueError(f"could not load {weights}: the file is corrupt, truncated or does not match "
                         f"unet/config.json ({type(err).__name__}: {err}).") from err
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"{weights} does not match unet/config.json: {problems}.")
    return unet


def load_components(
    name_or_path: Union[str, os.PathLike],
    revision: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    local_files_only: bool = False,
    torch_dtype: Optional[Union[torch.dtype, Dict[str, torch.dtype]]] = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    force_download: bool = False,
    dtype: Optional[Union[torch.dtype, Dict[str, torch.dtype]]] = None,
    unet: Optional[torch.nn.Module] = None,
    scheduler: Optional[object] = None,
    **diffusers_kwargs,
) -> Dict[str, object]:
    """``{"unet": DDPMUNet, "scheduler": DDPMScheduler}`` from a pipeline folder or Hub repo of any layout ddpm_hf
    writes, or a diffusers DDPM folder. Safetensors weights only unless ``allow_pickle=True`` (and even then
    ``torch.load(weights_only=True)``). Code files in the folder are never imported: ddpm_hf's own classes are used,
    so ``trust_remote_code`` (accepted for diffusers compatibility) changes nothing. ``dtype`` (diffusers' newer name
    of ``torch_dtype``; either, not both) is the U-Net's, or a dict of components' as in diffusers ("unet", else
    "default", else float32; the scheduler has none). The other arguments of
    diffusers' ``from_pretrained`` are taken where they mean something here (``use_safetensors``,
    ``low_cpu_mem_usage``, ``proxies=None``, ``device_map=None``, ``subfolder=None``, ``variant=None``) and refused,
    saying why, where they would be ignored. A ``unet`` or ``scheduler`` passed in is returned in place of the
    folder's, which is then neither downloaded nor read, as in diffusers."""
    _check_diffusers_kwargs(diffusers_kwargs, allow_pickle)
    safetensors_only = diffusers_kwargs.get("use_safetensors") is True  # as diffusers, whatever allow_pickle
    allow_pickle = allow_pickle and not safetensors_only
    if dtype is not None and torch_dtype is not None:
        raise ValueError("from_pretrained() got both dtype and torch_dtype: pass one (dtype is diffusers' newer name).")
    dtype = torch_dtype if dtype is None else dtype
    if isinstance(dtype, dict):
        dtype = dtype.get("unet", dtype.get("default", torch.float32))
    given = {name: value for name, value in (("unet", unet), ("scheduler", scheduler)) if value is not None}
    to_read = [name for name in ("unet", "scheduler") if name not in given]
    folder = resolve_folder(name_or_path, revision, token, cache_dir, local_files_only, allow_pickle, force_download,
                            components=to_read)
    index = _read_json(folder / "model_index.json")
    missing = [name for name in to_read if name not in index]
    others = [name for name, value in index.items() if not name.startswith("_") and name not in ("unet", "scheduler")
              and isinstance(value, list) and value[-1] is not None]  # e.g. a latent diffusion's vqvae
    if missing or others:
        raise ValueError(f"{folder / 'model_index.json'} ({index.get('_class_name')}) has "
                         f"{f'no {missing} entry' if missing else f'the components {others} too'}: not a pixel-space "
                         f"DDPM pipeline, which is a unet and a scheduler (components: "
                         f"{sorted(k for k in index if not k.startswith('_'))}); load it with "
                         "diffusers.DiffusionPipeline.from_pretrained.")
    if "scheduler" in to_read:  # first: another kind of diffusion is refused before the weights are read
        given["scheduler"] = _load_scheduler(folder, index)
    if "unet" in to_read:
        given["unet"] = _load_unet(folder, allow_pickle, dtype, safetensors_only)
    return given


def _load_scheduler(folder: Path, index: dict) -> DDPMScheduler:
    scheduler_class = index["scheduler"][-1] if isinstance(index["scheduler"], list) else None
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    if scheduler_class not in (None, "DDPMScheduler"):
        # diffusers saves every argument of a scheduler: those of DDPM's diffusion (DDIM, PNDM, Euler, DPM-Solver...)
        # have a beta_schedule; the others (ScoreSdeVe, KarrasVe, EDM, consistency models) are another diffusion,
        # which a DDPMScheduler would replace with its default β and score as a DDPM
        if "beta_schedule" not in scheduler_config:
            raise ValueError(f"{folder}: its scheduler is {scheduler_class}, whose configuration has no β schedule "
                             f"(beta_schedule, beta_start, beta_end; it holds "
                             f"{sorted(k for k in scheduler_config if not k.startswith('_'))}): not DDPM's diffusion, "
                             "which ddpm_hf samples and evaluates. Load it with "
                             "diffusers.DiffusionPipeline.from_pretrained.")
        logger.warning("%s: its scheduler is %s; ddpm_hf loads its configuration into its DDPMScheduler (the same "
                       "diffusion, ancestral sampling). To sample with %s: pipe.scheduler = diffusers.%s.from_config("
                       "pipe.scheduler.config)", folder, scheduler_class, scheduler_class, scheduler_class)
    _warn_unknown_keys(folder / "scheduler" / "scheduler_config.json", scheduler_config, DDPMScheduler)
    try:
        return DDPMScheduler.from_config(scheduler_config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / 'scheduler' / 'scheduler_config.json'}: {err}") from err


def _check_diffusers_kwargs(kwargs: dict, allow_pickle: bool) -> None:
    """diffusers' loading arguments that ddpm_hf's loader takes (doing what they ask, or nothing where nothing is to
    be done), or a ValueError naming the argument and what to do instead."""
    why = {
        "use_safetensors": (lambda v: v is not False or allow_pickle,
                            "False loads pickle weights, which can run code: add allow_pickle=True if you trust them"),
        "variant": (lambda v: v is None, "ddpm_hf saves one float32 file, no variants: leave it out and pass "
                                         "torch_dtype to cast"),
        "low_cpu_mem_usage": (lambda v: True, ""),  # the weights are read once either way
        "device_map": (lambda v: v is None, "load it, then move it with pipe.to(device)"),
        "subfolder": (lambda v: v is None, "a pipeline is a whole folder: pass the folder that holds "
                                           "model_index.json"),
        "proxies": (lambda v: v is None, "huggingface_hub takes proxies from HTTPS_PROXY / HTTP_PROXY"),
    }
    for name, value in kwargs.items():
        if name not in why:
            accepted = sorted(set(inspect.signature(load_components).parameters) - {"name_or_path", "diffusers_kwargs"}
                              | set(why))
            raise ValueError(f"from_pretrained() got an argument it does not take: {name}; it takes "
                             f"{', '.join(accepted)}.")
        accepts, instead = why[name]
        if not accepts(value):
            raise ValueError(f"from_pretrained({name}={value!r}): {instead}.")


@contextlib.contextmanager
def hub_timeout(seconds: float):
    """huggingface_hub's HTTP client waits forever by default: a stalled server would freeze training. Within this
    block its shared client gives up after ``seconds`` without progress (huggingface_hub then retries, and so do we);
    downloads keep their own limit (HF_HUB_DOWNLOAD_TIMEOUT). Entered once, on the main thread, for a whole run:
    changing the client closes the shared one, and with it the reads of other threads."""
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


def check_push_target(repo_id: str, token: Optional[str], private: bool) -> str:
    """The repo a training run will push to, checked before it trains, as diffusers' example does by creating it
    then (and not found unwritable at its first upload, hours later): no token, one the Hub refuses or one that only
    reads, a namespace that the token's account cannot write in, or a public repo that ``private`` would leave public
    (creating a repo makes it private; an existing one keeps its visibility) raise a ValueError naming the fix; a
    network failure, a ConnectionError. A ``repo_id`` without namespace is the account's, as on the Hub. The repo is
    created where it does not exist. Returns ``namespace/name``."""
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    from .pipelines.pipeline_ddpm_hf import writable_namespaces

    token = token or huggingface_hub.get_token()
    if not token:
        raise ValueError("--push_to_hub needs a Hub token with write access: pass --hub_token, set HF_TOKEN, or log "
                         "in with `hf auth login`.")
    api = HfApi(token=token)
    try:
        me = api.whoami()
        namespace, _, name = repo_id.rpartition("/")
        namespace = namespace or me["name"]
        repo_id = f"{namespace}/{name}"
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise ValueError(f"the Hub token ({me['name']}'s) can only read: pass a token with write access to "
                             f"{repo_id} (--hub_token or HF_TOKEN).")
        writers = writable_namespaces(me)
        if role == "fineGrained":  # its grants are scoped: said where none shows writing there (the format may vary)
            scoped = (((me.get("auth") or {}).get("accessToken") or {}).get("fineGrained") or {}).get("scoped") or []
            if not any("repo.write" in (grant.get("permissions") or []) and (grant.get("entity") or {}).get("name")
                       in (namespace, repo_id) for grant in scoped):
                logger.warning("the Hub token is fine-grained and shows no repo.write grant on %s or %s: if the "
                               "first upload is refused, pass a token with write access there", namespace, repo_id)
        elif namespace not in writers:
            raise ValueError(f"--hub_model_id {repo_id}: the Hub token's account, {me['name']}, cannot write in "
                             f"{namespace!r} (it writes in {', '.join(sorted(writers))}): push to "
                             f"{me['name']}/{name}, or pass a token of an account that writes there.")
        try:
            existing = api.repo_info(repo_id)
        except RepositoryNotFoundError:
            existing = None
        if existing is None:
            api.create_repo(repo_id, private=private or None, exist_ok=True)
        elif private and existing.private is False:
            raise ValueError(f"--hub_private_repo: {repo_id} exists and is public, and pushing does not change a "
                             "repo's visibility: the weights would be public. Make the repo private on the Hub (its "
                             "settings, or huggingface_hub's update_repo_settings(private=True)) first, or leave out "
                             "--hub_private_repo.")
    except HfHubHTTPError as err:
        message = redact(f"{type(err).__name__}: {err}", [token])
        if http_status(err) == 401:
            raise ValueError(f"the Hub refused the token ({message}): pass a valid token with write access "
                             "(--hub_token or HF_TOKEN).") from err
        if http_status(err) == 403:
            raise ValueError(f"--hub_model_id {repo_id}: the token may not create or write this repo ({message}): "
                             "pass a token with write access there, or another --hub_model_id.") from err
        raise ConnectionError(f"could not check --hub_model_id {repo_id} on the Hub ({message}): check the "
                              "connection and the Hub's status, then start again.") from err
    except (OSError, ValueError):
        raise
    except Exception as err:  # the HTTP client's own errors (a refused connection, a timeout) are not OSErrors
        raise ConnectionError(f"could not check --hub_model_id {repo_id} on the Hub ({type(err).__name__}: "
                              f"{redact(str(err), [token])}): check the connection and the Hub's status, then start "
                              "again.") from err
    return repo_id


def push_pipeline_with_retries(pipe, repo_id: str, *, step: int, token: Optional[str], private: bool, attempts: int,
                               grid_path: Optional[Path], training_config: dict, local_dir: str,
                               datasets: Optional[List[str]] = None, base_model: Optional[str] = None,
                               backoff_s: float = 2.0) -> bool:
    """Upload a training run's EMA pipeline (with the grid at ``grid_path``, if any), its model card naming
    ``datasets`` (the Hub datasets it was trained on) and ``base_model`` (the Hub model it started from) in its
    metadata. huggingface_hub retries 5xx answers, dropped
    connections and timeouts (see hub_timeout) itself, with backoff; on top of that the whole upload is tried
    ``attempts`` times with exponential backoff (backoff_s, 2·backoff_s, ...); a refusal of the token (401, 403) is
    not tried again. A failure is reported and False returned. Local files are never modified and no token reaches
    the log. Each attempt's commit names the repo's head of that moment as its parent (see _on_current_head): a commit
    the client gave up on (a timeout) that the Hub takes later, after a newer upload, is then refused (412) instead of
    laying older weights over the newer ones."""
    import huggingface_hub
    from PIL import Image

    secrets = [token, huggingface_hub.get_token()]
    api = huggingface_hub.HfApi(token=token)

    def push(parent: str) -> None:
        pipe.push_to_hub(repo_id, private=private or None, token=token, parent_commit=parent,
                         commit_message=f"ddpm_hf: EMA weights at step {step}",
                         sample_grid=Image.open(grid_path) if grid_path else False,
                         training_config=training_config, datasets=datasets, base_model=base_model)

    for attempt in range(1, attempts + 1):
        try:
            _on_current_head(api, repo_id, private, push)
            logger.info("pushed the EMA pipeline of step %d to %s", step, repo_id)
            return True
        except Exception as err:  # network, auth, server: report without the token and go on
            message = redact(f"{type(err).__name__}: {err}", secrets)
            if http_status(err) in (401, 403):  # the token, or its rights, changed since the run's start
                logger.error("push to %s refused (%s): it would be refused again; pass a token with write access "
                             "(--hub_token or HF_TOKEN) when the run resumes. Step %d stays in %s", repo_id, message,
                             step, local_dir)
                return False
            logger.warning("push to %s failed (attempt %d/%d): %s", repo_id, attempt, attempts, message)
            if attempt < attempts:
                time.sleep(min(backoff_s * 2 ** (attempt - 1), 60))
    logger.error("gave up pushing step %d to %s after %d attempts; it stays in %s", step, repo_id, attempts,
                 local_dir)
    return False


def _on_current_head(api, repo_id: str, private: bool, push: Callable[[str], None], tries: int = 3) -> None:
    """``push(parent)``, ``parent`` the repo's head of now (the repo made first where it does not exist). A refusal
    because the head moved meanwhile (412: a commit landed, perhaps this upload's own earlier try, which the Hub took
    after huggingface_hub had given up on it and sent it again) is pushed again on the new head, up to ``tries``
    times: what landed is not newer than this upload, the run's newest weights."""
    from huggingface_hub.errors import RepositoryNotFoundError

    for tried in range(1, tries + 1):
        try:
            head = api.repo_info(repo_id).sha
        except RepositoryNotFoundError:
            api.create_repo(repo_id, private=private or None, exist_ok=True)  # (training made it: check_push_target)
            head = api.repo_info(repo_id).sha
        try:
            return push(head)
        except Exception as err:
            if http_status(err) != 412 or tried == tries:
                raise
            logger.info("%s moved on during the upload (HTTP 412): pushing again on its new head", repo_id)


class Uploads:
    """A training run's uploads of its EMA pipeline (by the main process), off the training loop. A checkpoint's
    upload runs in a thread while training goes on: waiting for it, the other processes would stand at their next
    meeting (up to --ddp_timeout, then the run would end) and every GPU would idle. One runs at a time: a checkpoint
    due while one is running is not uploaded (the next, or the final one, carries newer weights). The final upload
    runs once training is over (``finish``), the other processes gone. ``push(pipeline, grid, step)`` uploads and
    says whether it did; ``resumable``: the run's last step has a checkpoint to resume from."""

    def __init__(self, push: Callable[[object, Optional[Path], int], bool], output_dir: str, repo_id: str,
                 resumable: bool):
        self.upload, self.output_dir, self.repo_id, self.resumable = push, output_dir, repo_id, resumable
        self.running: Optional[Tuple[threading.Thread, int]] = None  # a checkpoint's upload, and its step
        self.final: Optional[tuple] = None  # (pipeline, grid, step) of the final upload, until it is made

    def push(self, pipe, grid: Optional[Path], step: int, final: bool) -> None:
        """Upload ``pipe`` (a copy of the network, moved to the host here: training goes on in the device's memory),
        with ``grid`` (None: none, e.g. where it did not fit), now or when training is over (``final``). A checkpoint's
        is pushed only when the caller found no upload running (``busy``), before it made the pipeline and grid."""
        pipe.to("cpu")
        if final:
            self.final = (pipe, grid, step)
            return
        thread = threading.Thread(target=self.upload, args=(pipe, grid, step), daemon=True,
                                  name=f"ddpm_hf-upload-{step}")
        thread.start()
        self.running = (thread, step)

    def busy(self, step: int) -> bool:
        """Whether a checkpoint's upload is still running, so that step ``step``'s is not made (said): asked before
        its grid is sampled, which would cost a sampling of the whole chain for nothing."""
        if self.running is not None and self.running[0].is_alive():
            logger.warning("the upload of step %d is still running: step %d is not uploaded (a later upload carries "
                           "newer weights)", self.running[1], step)
            return True
        return False

    def abandon(self, why: BaseException) -> None:
        """Said when the run stops with an upload running: its thread ends with the process."""
        if self.running is not None and self.running[0].is_alive():
            logger.warning("the upload of step %d is abandoned: the run stopped (%s)", self.running[1],
                           type(why).__name__)

    def finish(self) -> None:
        """Wait for a checkpoint's upload, then make the final one; a final upload that fails ends the run with an
        error (after everything is saved): the model asked for on the Hub is not there."""
        if self.running is not None:
            if self.running[0].is_alive():
                logger.info("waiting for the upload of step %d before the final one", self.running[1])
            self.running[0].join()
        if self.final is None:
            return
        pipe, grid, step = self.final
        if not self.upload(pipe, grid, step):
            again = (f"the same command with --resume_from_checkpoint latest --max_train_steps {step} (it trains "
                     "nothing more), or " if self.resumable else "")
            raise SystemExit(f"training is done and its pipeline is in {self.output_dir}, but it could not be pushed "
                             f"to {self.repo_id} (see the errors above). Push it with {again}"
                             f"ddpm_hf.DDPMPipeline.from_pretrained({str(self.output_dir)!r}).push_to_hub("
                             f"{self.repo_id!r}).")
