"""Exponential moving average of the weights (the paper samples and evaluates with EMA 0.9999, from step 0)."""

from typing import Iterable, Optional, Sequence

import torch


class EMA:
    """θ_ema ← d θ_ema + (1 − d) θ after every optimizer step, in float32 whatever the training precision.

    ``warmup=False`` (the paper): d = max_decay from the first step. ``warmup=True``: d = min(max_decay,
    (1 + n) / (10 + n)), which lets short runs move away from the initialisation. ``power_ramp=(γ, p)``: diffusers'
    example's ramp (its EMAModel with use_ema_warmup), d = min(max_decay, 1 − (1 + n / γ)^−p) after n updates, the
    first update a copy; with its defaults (1, 3/4) it reaches 0.9999 after about 215,000 updates.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], max_decay: float = 0.9999, warmup: bool = False,
                 power_ramp: Optional[Sequence[float]] = None):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {max_decay}.")
        if power_ramp is not None and (warmup or len(power_ramp) != 2 or min(power_ramp) <= 0):
            raise ValueError(f"the power ramp takes (inv_gamma, power), both positive, without the warm-up; got "
                             f"{power_ramp!r} (warmup={warmup}).")
        self.shadow = [p.detach().float().clone() for p in parameters]
        self.max_decay, self.warmup, self.num_updates = max_decay, warmup, 0
        self.power_ramp = None if power_ramp is None else [float(v) for v in power_ramp]

    def decay(self) -> float:
        n = self.num_updates
        if self.power_ramp is not None:
            inv_gamma, power = self.power_ramp
            return 0.0 if n == 0 else min(self.max_decay, 1 - (1 + n / inv_gamma) ** -power)
        if not self.warmup:
            return self.max_decay
        return min(self.max_decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> float:
        d = self.decay()
        params = [p.detach().float() for p in parameters]
        torch._foreach_lerp_(self.shadow, params, 1.0 - d)
        self.num_updates += 1
        return d

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for shadow, p in zip(self.shadow, parameters):
            p.copy_(shadow.to(p.dtype))

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "max_decay": self.max_decay, "warmup": self.warmup,
                "num_updates": self.num_updates, "power_ramp": self.power_ramp}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("the EMA state does not match the model (different number of parameters).")
        # on the device of the weights it follows (a checkpoint is read onto the CPU)
        self.shadow = [s.to(own.device, torch.float32, copy=True) for s, own in zip(state["shadow"], self.shadow)]
        self.max_decay, self.warmup, self.num_updates = state["max_decay"], state["warmup"], state["num_updates"]
        self.power_ramp = state.get("power_ramp")  # (checkpoints before it: None, the decay they were written with)
