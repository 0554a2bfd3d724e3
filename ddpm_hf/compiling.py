"""torch.compile of the U-Net, one way for training and sampling.

What to compile with comes from accelerate's torch dynamo settings when they are set (the environment `accelerate
launch --dynamo_backend inductor --dynamo_mode reduce-overhead ...` sets, from its flags or from `accelerate
config`'s defaults), else from ``--compile`` (torch's defaults). The U-Net is compiled in place, so its weights keep
their names (accelerate's own wrapper would name them ``_orig_mod.*`` in every checkpoint and pipeline), and one
call checks the compiled network before any real work.
"""

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple

from torch import nn

from .errors import first_line, is_out_of_memory

COMPILE_FLAG = "--compile"


def compile_options(compile_flag: bool) -> Tuple[Optional[dict], str]:
    """torch.compile's arguments for the U-Net (None: not compiled) and the setting they come from: accelerate's
    dynamo settings (backend, mode, fullgraph, dynamic) when a backend is set, else torch's defaults under
    ``--compile``. Settings that cannot be honoured raise a ValueError naming them."""
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin

    try:
        requested = TorchDynamoPlugin()  # reads accelerate's ACCELERATE_DYNAMO_* settings
    except ValueError as err:
        raise ValueError(f"accelerate's dynamo settings: {err}") from err
    if requested.backend == DynamoBackend.NO:
        return ({}, COMPILE_FLAG) if compile_flag else (None, "")
    if requested.use_regional_compilation:
        raise ValueError("accelerate's regional compilation (--dynamo_use_regional_compilation) is not supported: the "
                         "U-Net is compiled whole, in place, which keeps its weights' names; launch without it.")
    return requested.to_kwargs(), f"accelerate's dynamo settings ({requested.backend.value.lower()})"


def compile_checked(unet: nn.Module, probe: Callable[[], None], options: dict, source: str, command: str) -> None:
    """``torch.compile(**options)`` ``unet`` in place (its state_dict keys stay plain) and call ``probe()`` once: a
    compiler failure surfaces here, before the real work, as a RuntimeError naming ``source``, the setting that asked
    for it, and how to ``command`` without it (the module is left uncompiled); the real calls reuse the compiled
    graph. A probe that runs out of memory raises that error as it is: dropping the compilation would not help."""
    try:
        unet.compile(**options)  # an unknown mode or backend fails here
        probe()
    except Exception as err:
        unet._compiled_call_impl = None  # what nn.Module.compile set: back to the plain forward
        if is_out_of_memory(err):  # the probe's batch does not fit, compiled or not: not a compiler failure
            raise
        fix = (f"{command} without {COMPILE_FLAG}" if source == COMPILE_FLAG
               else "launch with `--dynamo_backend no` (or unset ACCELERATE_DYNAMO_BACKEND)")
        raise RuntimeError(f"{source}: torch.compile of the U-Net failed ({type(err).__name__}: {first_line(err)}); "
                           f"{fix}.") from err


@contextmanager
def uncompiled(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` run as written inside the block, its in-place compilation set aside and restored after: for a few
    calls at shapes it was not compiled for, which would compile it again (and, with CUDA graphs, record them)."""
    compiled, module._compiled_call_impl = module._compiled_call_impl, None
    try:
        yield module
    finally:
        module._compiled_call_impl = compiled
