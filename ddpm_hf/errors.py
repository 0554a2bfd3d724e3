"""Error messages: one line of an exception, for messages that name the problem and the fix; running out of memory."""

import torch


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a failed allocation: torch's OutOfMemoryError (CUDA), or the RuntimeError of the CPU's
    allocator ("can't allocate memory") or of MPS ("MPS backend out of memory")."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "backend out of memory" in text)


def memory_in_use(device: torch.device) -> str:
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
    """Hand the blocks torch's CUDA allocator keeps cached back to the GPU, after an allocation failed and what it
    was for was dropped: the next allocations start from a defragmented pool."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
