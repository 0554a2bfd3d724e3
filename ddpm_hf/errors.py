"""Error messages: one line of an exception, for messages that name the problem and the fix; running out of memory."""

import os
from typing import Optional

import torch


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def local_path_hint(name: str) -> str:
    """For a name read as a Hub repo id ('namespace/name') that the Hub did not give: a sentence saying there is no
    such folder here either (a mistyped local path, 'data/flat_grey' for 'data/flat_gray', or a relative one given
    from another folder, is otherwise reported as a Hub failure only), naming its first part where that one is a
    folder here; '' where ``name`` is a folder."""
    if os.path.isdir(name):
        return ""
    first = name.split("/")[0]
    if "/" in name and first and os.path.isdir(first):
        return f" There is no folder {name} here either, though {first}/ is one: a typo in a local path?"
    return (f" There is no local folder {name} either (a relative path is read from the current folder, "
            f"{os.getcwd()}).")


def http_status(err: BaseException) -> Optional[int]:
    """The HTTP status of an error that carries its response (huggingface_hub's, fsspec's); None for a network
    error, a timeout, ..."""
    return getattr(getattr(err, "response", None), "status_code", None)


# What allocators and libraries say when memory runs out: the CPU allocator, CUDA ("CUDA out of memory", "CUDA error:
# out of memory"), MPS ("MPS backend out of memory"), and cuBLAS/cuDNN creating their workspaces on a full GPU.
OUT_OF_MEMORY_TEXTS = ("can't allocate memory", " out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a failed allocation, or wraps one (torch.compile reraises a backend's error as its cause,
    context or ``inner_exception``): torch's OutOfMemoryError, Python's MemoryError (PIL, numpy, pyarrow), or an
    error whose message is one of :data:`OUT_OF_MEMORY_TEXTS`."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(err, RuntimeError) and any(text in str(err) for text in OUT_OF_MEMORY_TEXTS):
            return True
        err = err.__cause__ or err.__context__ or getattr(err, "inner_exception", None)
    return False


def out_of_memory_detail(err: BaseException, device: torch.device) -> str:
    """The parenthesis of an out-of-memory message: ``err``'s first line, and what holds the memory of ``device``."""
    held = _memory_in_use(device)
    return f"{first_line(err)}; {held}" if held else first_line(err)


def _memory_in_use(device: torch.device) -> str:
    """What holds the memory of ``device``, for an out-of-memory message: on CUDA what torch holds of the GPU's total,
    on the host a limit on the process's address space (ulimit -v) when one is set."""
    if device.type == "cuda":
        gib = 2**30
        total = torch.cuda.get_device_properties(device).total_memory
        return (f"torch holds {torch.cuda.memory_reserved(device) / gib:.1f} GiB of the GPU's {total / gib:.1f} GiB, "
                f"{torch.cuda.memory_allocated(device) / gib:.1f} GiB of it in tensors")
    try:
        import resource
    except ImportError:  # not POSIX
        return ""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if device.type == "cpu" and limit != resource.RLIM_INFINITY:
        return f"this process may use at most {limit / 2**30:.1f} GiB of address space (ulimit -v)"
    return ""


def release_cached_memory(device: torch.device) -> None:
    """Hand the blocks torch's CUDA allocator keeps cached back to the GPU, once the work that ran out of memory and
    its exception are gone: the next allocations start from a defragmented pool."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ResumeMismatch(ValueError):
    """A readable checkpoint written under other settings than this run's (its data streams, its dataset's commit):
    resuming from it, or from an older one, would not continue that run. Stops the resume with the fix."""
