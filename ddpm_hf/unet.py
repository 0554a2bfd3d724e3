# Copyright 2026 The ddpm_hf authors. Apache-2.0.
"""The ε-predictor of Ho, Jain & Abbeel (2020), §4 and Appendix B: a PixelCNN++-style U-Net with sinusoidal time
embedding, residual blocks, self-attention at chosen resolutions and skip connections.

Self-contained: depends on torch and diffusers' base classes only, so the file can be shipped into a Hub repo as is.

Interchangeable with ``diffusers.UNet2DModel``: the configuration uses UNet2DModel's keys and meanings, and the
parameter names are UNet2DModel's (those of the google/ddpm-cifar10-32 checkpoint, whose older attention key names
``query/key/value/proj_attn`` are renamed on load by diffusers' ModelMixin), so weights move both ways unchanged.

Deliberately not supported (ValueError at construction): Fourier/learned time embeddings, skip blocks, resnet up/down
sampling and spatial norms; none of them is part of a DDPM.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


@dataclass
class DDPMUNetOutput(BaseOutput):
    """Output of :class:`DDPMUNet`: ``sample`` is ε_θ(x_t, t) (or x_0 / v, and the variance channels if learned)."""

    sample: torch.Tensor


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """The Transformer's sinusoidal position embedding of the timestep (§4, "Diffusion time t is specified by adding
    the Transformer sinusoidal position embedding"): frequencies 10000^(−i / (dim/2 − freq_shift)).
    The original DDPM code is ``freq_shift=1, flip_sin_to_cos=False`` (sin first)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - freq_shift)
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos else [torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepMLP(nn.Module):
    """The 2-layer MLP on the sinusoidal embedding: Linear → SiLU → Linear (keys ``linear_1``, ``linear_2``).
    SiLU whatever ``act_fn`` says, as in UNet2DModel."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(emb)))


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and keys), with a speed choice under autocast: autocast computes group norm
    in float32, so in bf16/fp16 training each norm writes float32 activations that the next convolution casts back.
    On the device types in ``autocast_dtype_on`` it runs in the autocast dtype instead (the kernel still accumulates
    its statistics in float32; only the output is rounded, as the next convolution's input cast rounds it anyway),
    without that float32 round trip. Empty by default, so autocast's own float32 norm (diffusers') runs until a
    measurement (bench/gpu.sh) picks; outside autocast nothing changes."""

    autocast_dtype_on: set = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if device not in self.autocast_dtype_on or not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)


class ResnetBlock(nn.Module):
    """PixelCNN++/Wide-ResNet block: GN → act → conv3×3 (+ projection of the time embedding) → GN → act → dropout →
    conv3×3, plus a 1×1 shortcut when the channel count changes. With ``scale_shift`` the time embedding modulates
    the second norm as (1 + scale)·GN(h) + shift (improved-diffusion's variant) instead of being added."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float, dropout: float, act: str,
                 time_scale_shift: bool, output_scale_factor: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, 2 * out_ch if time_scale_shift else out_ch)
        self.norm2 = GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.nonlinearity = ACTIVATIONS[act]()
        self.time_scale_shift = time_scale_shift
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """``temb_act`` is act(time embedding), computed once per forward and shared by every block."""
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        temb = self.time_emb_proj(temb_act)[:, :, None, None]
        if self.time_scale_shift:
            scale, shift = temb.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + temb)
        h = self.nonlinearity(h)
        if self.dropout.p > 0:  # nn.Dropout(0) in training mode still draws and applies a mask
            h = self.dropout(h)
        h = self.conv2(h)
        out = self._shortcut(x) + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """x, or its 1×1 convolution when the channel count changes. On channels-last activations (the CPU path)
        the convolution runs as what it is, a linear map of each pixel's channels: one GEMM on the (B·H·W, C) pixel
        matrix (faster than oneDNN's 1×1 convolution here). It also keeps the weight's gradient in the weight's
        strides: a (O, I, 1, 1) weight counts as channels-last too, so the convolution's backward returns its
        gradient with channels-last strides, which DDP compares literally with its gradient buckets ("Grad strides do
        not match bucket view strides", at every multi-process run's first backward)."""
        conv = self.conv_shortcut
        if conv is None:
            return x
        if x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)
        return conv(x)


class SelfAttention(nn.Module):
    """Spatial self-attention with a residual connection (§4: "self-attention at the 16×16 feature map resolution"):
    GN → q, k, v (linear over channels) → softmax(q kᵀ / √d) v → linear → + input. Keys as diffusers' Attention."""

    # Lets diffusers' ModelMixin rename the pre-0.14 keys (query/key/value/proj_attn) of old Hub checkpoints on load.
    _from_deprecated_attn_block = True

    def __init__(self, channels: int, head_dim: int, groups: Optional[int], eps: float, output_scale_factor: float):
        super().__init__()
        self.heads = max(channels // head_dim, 1)
        self.head_dim = head_dim
        inner = self.heads * head_dim
        self.group_norm = GroupNorm(groups, channels, eps=eps) if groups is not None else None
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels), nn.Dropout(0.0)])
        self.output_scale_factor = output_scale_factor
        self.use_sdpa = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.group_norm(x) if self.group_norm is not None else x
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        # One GEMM for q, k and v: the three weights stay separate parameters so the keys match diffusers.
        qkv = F.linear(tokens, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]),
                       torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias]))
        q, k, v = qkv.view(b, hgt * wid, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_sdpa:
            attn = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = torch.softmax((q @ k.transpose(-1, -2)).float() * self.head_dim**-0.5, dim=-1).to(q.dtype)
            attn = weights @ v
        out = self.to_out[0](attn.transpose(1, 2).reshape(b, hgt * wid, self.heads * self.head_dim))
        out = out.transpose(1, 2).reshape(b, c, hgt, wid) + x
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample(nn.Module):
    """Strided 3×3 convolution. ``padding=0`` pads only right and bottom, as TensorFlow's "SAME" in the original."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution.

    Computed without materialising the upsampled image: on a nearest-upsampled input, the 3×3 kernel sees only a 2×2
    neighbourhood of the low-resolution input for each of the four output phases, so one 2×2 convolution with 4×C
    outputs (the summed taps) followed by a pixel interleave gives the same result with 16 instead of 36 multiply-adds
    per input pixel and channel pair. Which formulation runs is chosen per device type (``phases_on``): the phase
    form won on CPU (bench/unet.py); on other devices diffusers' own formulation (interpolate, then convolve) runs
    until a measurement there (bench/gpu.sh) says otherwise. Both give the same result to float rounding.
    """

    phases_on = {"cpu"}

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def _phase_kernels(self) -> torch.Tensor:
        w = self.conv.weight  # (C_out, C_in, 3, 3)
        # Rows (then columns): even output rows see input rows (i−1, i) with taps (w0, w1 + w2); odd rows see (i, i+1)
        # with taps (w0 + w1, w2).
        rows = torch.stack([torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
                            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2)])  # (2, C_out, C_in, 2, 3)
        cols = torch.stack([torch.stack([rows[..., 0], rows[..., 1] + rows[..., 2]], -1),
                            torch.stack([rows[..., 0] + rows[..., 1], rows[..., 2]], -1)], 1)  # (2, 2, C_out, C_in, 2, 2)
        return cols.reshape(4 * w.shape[0], w.shape[1], 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type not in self.phases_on:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        b, _, h, w = x.shape
        c = self.conv.out_channels
        phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), self._phase_kernels(), self.conv.bias.repeat(4))
        # Channels-last view (B, H+1, W+1, row phase, column phase, C); phase (a, b) starts at offset (a, b).
        phases = phases.permute(0, 2, 3, 1).reshape(b, h + 1, w + 1, 2, 2, c)
        rows = [torch.stack([phases[:, a:a + h, col:col + w, a, col] for col in (0, 1)], 3) for a in (0, 1)]
        out = torch.stack(rows, 2).reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


class _CheckpointableBlock(nn.Module):
    """Runs a sub-module through diffusers' gradient-checkpointing function when it is enabled and grads are on."""

    gradient_checkpointing = False

    def _run(self, module: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)


class DownBlock2D(_CheckpointableBlock):
    """One resolution level of the encoder, diffusers' ``DownBlock2D``: ``layers`` ResNet blocks and a downsampler;
    returns every intermediate output for the skip connections."""

    with_attention = False

    def __init__(self, in_ch: int, out_ch: int, layers: int, downsample: bool, resnet_kwargs: dict,
                 attention_kwargs: dict, downsample_padding: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, **resnet_kwargs) for i in range(layers))
        if self.with_attention:
            self.attentions = nn.ModuleList(SelfAttention(out_ch, **attention_kwargs) for _ in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_ch, downsample_padding)]) if downsample else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        skips = ()
        for i, resnet in enumerate(self.resnets):
            x = self._run(resnet, x, temb_act)
            if self.with_attention:
                x = self._run(self.attentions[i], x)
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class AttnDownBlock2D(DownBlock2D):
    """diffusers' ``AttnDownBlock2D``: a :class:`DownBlock2D` with self-attention after each ResNet block (§4: at the
    16×16 resolution)."""

    with_attention = True


class UpBlock2D(_CheckpointableBlock):
    """One resolution level of the decoder, diffusers' ``UpBlock2D``: ``layers`` ResNet blocks on [h, skip] and an
    upsampler."""

    with_attention = False

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, layers: int, upsample: bool, resnet_kwargs: dict,
                 attention_kwargs: dict):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock((prev_ch if i == 0 else out_ch) + (in_ch if i == layers - 1 else out_ch), out_ch,
                        **resnet_kwargs)
            for i in range(layers))
        if self.with_attention:
            self.attentions = nn.ModuleList(SelfAttention(out_ch, **attention_kwargs) for _ in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], temb_act: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = self._run(resnet, torch.cat([x, skips[-1 - i]], dim=1), temb_act)
            if self.with_attention:
                x = self._run(self.attentions[i], x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class AttnUpBlock2D(UpBlock2D):
    """diffusers' ``AttnUpBlock2D``: an :class:`UpBlock2D` with self-attention after each ResNet block."""

    with_attention = True


class UNetMidBlock2D(_CheckpointableBlock):
    """The bottleneck, diffusers' ``UNetMidBlock2D``: ResNet → attention → ResNet."""

    def __init__(self, channels: int, add_attention: bool, resnet_kwargs: dict, attention_kwargs: dict):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, **resnet_kwargs) for _ in range(2))
        self.attentions = nn.ModuleList([SelfAttention(channels, **attention_kwargs) if add_attention else None])

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        x = self._run(self.resnets[0], x, temb_act)
        if self.attentions[0] is not None:
            x = self._run(self.attentions[0], x)
        return self._run(self.resnets[1], x, temb_act)


# The block types of UNet2DModel's config that a DDPM uses, by the class that builds each.
DOWN_BLOCKS = {block.__name__: block for block in (DownBlock2D, AttnDownBlock2D)}
UP_BLOCKS = {block.__name__: block for block in (UpBlock2D, AttnUpBlock2D)}
DOWN_BLOCK_TYPES, UP_BLOCK_TYPES = tuple(DOWN_BLOCKS), tuple(UP_BLOCKS)


class DDPMUNet(ModelMixin, ConfigMixin):
    """The DDPM U-Net ε_θ(x_t, t), configured with ``diffusers.UNet2DModel``'s keys.

    The paper's CIFAR-10 network (35,746,307 parameters) is ``block_out_channels=(128, 256, 256, 256)``,
    ``layers_per_block=2``, attention at 16×16 (``AttnDownBlock2D`` second, ``AttnUpBlock2D`` third),
    ``freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None``, dropout 0.1
    for training; ``ddpm_hf.presets`` holds it and the others. For learned variances set ``out_channels`` to twice
    ``in_channels`` (the scheduler splits the output).

    Forward: ``model(sample, timestep)`` with a scalar timestep or one per batch element; returns
    :class:`DDPMUNetOutput` (``.sample``) or a tuple with ``return_dict=False``.
    """

    _supports_gradient_checkpointing = True
    # Device types whose activations run channels-last (a speed choice only, like ``Upsample.phases_on``): oneDNN's
    # convolutions run faster in that layout on CPU (bench/unet.py); elsewhere diffusers' contiguous layout runs
    # until a measurement there (bench/gpu.sh) says otherwise. Dropout draws its masks in memory order: in training
    # on the CPU they are other masks than UNet2DModel's for the same seed (the same distribution); empty this set
    # for UNet2DModel's masks bit for bit.
    channels_last_on = {"cpu"}

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[Union[int, Tuple[int, int]]] = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: Optional[int] = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: Tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: Optional[str] = "UNetMidBlock2D",
        up_block_types: Tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: Tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: Optional[int] = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: Optional[int] = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: Optional[str] = None,
        num_class_embeds: Optional[int] = None,
        num_train_timesteps: Optional[int] = None,
    ):
        super().__init__()
        self._validate_config()
        channels = list(block_out_channels)
        base = channels[0]
        time_dim = time_embedding_dim or base * 4

        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.time_embedding = TimestepMLP(base, time_dim)
        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepMLP(base, time_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        else:
            self.class_embedding = None
        self.time_act = ACTIVATIONS[act_fn]()

        scale_shift = resnet_time_scale_shift == "scale_shift"
        resnet_kwargs = dict(temb_ch=time_dim, groups=norm_num_groups, eps=norm_eps, dropout=dropout, act=act_fn,
                             time_scale_shift=scale_shift, output_scale_factor=1.0)

        def attention_kwargs(ch: int, groups: Optional[int] = norm_num_groups, scale: float = 1.0) -> dict:
            return dict(head_dim=attention_head_dim or ch, groups=groups, eps=norm_eps, output_scale_factor=scale)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(down_block_types):
            self.down_blocks.append(DOWN_BLOCKS[kind](
                channels[max(i - 1, 0)], channels[i], layers_per_block, downsample=i < len(channels) - 1, resnet_kwargs=resnet_kwargs,
                attention_kwargs=attention_kwargs(channels[i]), downsample_padding=downsample_padding))

        self.mid_block = None
        if mid_block_type is not None:
            # diffusers' UNetMidBlock2D: without explicit attn groups, the attention is normed only in "default" mode.
            mid_groups = attn_norm_num_groups if attn_norm_num_groups is not None else (None if scale_shift else norm_num_groups)
            self.mid_block = UNetMidBlock2D(
                channels[-1], add_attention,
                dict(resnet_kwargs, output_scale_factor=mid_block_scale_factor),
                attention_kwargs(channels[-1], mid_groups, mid_block_scale_factor))

        reversed_channels = channels[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(up_block_types):
            self.up_blocks.append(UP_BLOCKS[kind](
                in_ch=reversed_channels[min(i + 1, len(channels) - 1)],
                prev_ch=reversed_channels[max(i - 1, 0)], out_ch=reversed_channels[i], layers=layers_per_block + 1,
                upsample=i < len(channels) - 1, resnet_kwargs=resnet_kwargs,
                attention_kwargs=attention_kwargs(reversed_channels[i])))

        self.conv_norm_out = GroupNorm(norm_num_groups, base, eps=norm_eps)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn says, as in UNet2DModel
        self.conv_out = nn.Conv2d(base, out_channels, 3, padding=1)

    def _validate_config(self) -> None:
        c = self.config

        def fail(msg: str):
            raise ValueError(f"DDPMUNet: {msg}")

        if c.time_embedding_type != "positional":
            fail(f"time_embedding_type={c.time_embedding_type!r} is not supported; DDPM uses 'positional'.")
        if c.downsample_type != "conv" or c.upsample_type != "conv":
            fail("only downsample_type='conv' and upsample_type='conv' are supported (the paper's resampling).")
        if c.resnet_time_scale_shift not in ("default", "scale_shift"):
            fail(f"resnet_time_scale_shift={c.resnet_time_scale_shift!r}; choose 'default' or 'scale_shift'.")
        if c.act_fn not in ACTIVATIONS:
            fail(f"act_fn={c.act_fn!r}; choose one of {sorted(ACTIVATIONS)}.")
        if c.mid_block_type not in ("UNetMidBlock2D", None):
            fail(f"mid_block_type={c.mid_block_type!r}; choose 'UNetMidBlock2D' or None.")
        bad = [b for b in c.down_block_types if b not in DOWN_BLOCK_TYPES] + [b for b in c.up_block_types if b not in UP_BLOCK_TYPES]
        if bad:
            fail(f"unsupported block types {bad}; down blocks: {DOWN_BLOCK_TYPES}, up blocks: {UP_BLOCK_TYPES}.")
        if not (len(c.down_block_types) == len(c.up_block_types) == len(c.block_out_channels)):
            fail("down_block_types, up_block_types and block_out_channels must have the same length "
                 f"(got {len(c.down_block_types)}, {len(c.up_block_types)}, {len(c.block_out_channels)}).")
        groups = c.norm_num_groups
        for ch in c.block_out_channels:
            if ch % groups:
                fail(f"block_out_channels {list(c.block_out_channels)} must be multiples of norm_num_groups={groups}.")
        if c.class_embed_type not in (None, "timestep", "identity"):
            fail(f"class_embed_type={c.class_embed_type!r}; choose None, 'timestep' or 'identity'.")
        # An attention of fewer channels than attention_head_dim has no head in UNet2DModel (channels // head_dim
        # heads: a zero-width attention), which its folders then hold; refused, as neither side could load the other's.
        down = zip(c.block_out_channels, c.down_block_types)
        up = zip(reversed(c.block_out_channels), c.up_block_types)
        attended = ([ch for ch, kind in [*down, *up] if kind.startswith("Attn")]
                    + ([c.block_out_channels[-1]] if c.mid_block_type is not None and c.add_attention else []))
        if c.attention_head_dim is not None and not isinstance(c.attention_head_dim, int):
            fail(f"attention_head_dim={c.attention_head_dim!r}; pass one integer (the channels of a head) or None.")
        if c.attention_head_dim and attended and c.attention_head_dim > min(attended):
            fail(f"attention_head_dim={c.attention_head_dim} exceeds the {min(attended)} channels of an attention "
                 f"block: UNet2DModel would give it no head; use at most {min(attended)}.")

    # -- helpers ----------------------------------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        return len(self.config.block_out_channels)

    def set_attention_implementation(self, implementation: str) -> None:
        """``"sdpa"`` (torch's fused scaled_dot_product_attention, default) or ``"math"`` (explicit softmax)."""
        if implementation not in ("sdpa", "math"):
            raise ValueError(f"attention implementation {implementation!r}; choose 'sdpa' or 'math'.")
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.use_sdpa = implementation == "sdpa"

    @torch.no_grad()
    def initialize_like_ddpm(self, generator: Optional[torch.Generator] = None) -> "DDPMUNet":
        """The original code's initialisation: variance scaling (fan_avg, uniform, scale 1) for every convolution
        and linear layer, zero biases, and zero for the last convolution of each residual branch, the attention's
        output projection and the output convolution, so that every block starts as the identity."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                receptive = module.weight[0, 0].numel() if module.weight.ndim > 2 else 1
                fan_avg = (module.weight.shape[0] + module.weight.shape[1]) * receptive / 2
                bound = math.sqrt(3.0 / fan_avg)
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.zero_()
        zeroed = [self.conv_out.weight]
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                zeroed.append(module.conv2.weight)
            elif isinstance(module, SelfAttention):
                zeroed.append(module.to_out[0].weight)
        for weight in zeroed:
            weight.zero_()
        return self

    def _check_inputs(self, sample: torch.Tensor, timesteps: torch.Tensor) -> None:
        c = self.config
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"sample must have shape (batch, {c.in_channels}, height, width); got {tuple(sample.shape)}.")
        factor = 2 ** (self.num_levels - 1)
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for {self.num_levels} resolution levels; got "
                f"{sample.shape[2]}×{sample.shape[3]} (resize or pad the input, e.g. to sample_size={c.sample_size}).")
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, sample.shape[0])):
            raise ValueError(f"timestep must be a scalar or have one value per sample ({sample.shape[0]}); "
                             f"got shape {tuple(timesteps.shape)}.")

    # -- forward ----------------------------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[DDPMUNetOutput, Tuple[torch.Tensor]]:
        c = self.config
        if torch.is_tensor(timestep):
            timesteps = timestep.to(sample.device)
            timesteps = timesteps if timesteps.is_floating_point() else timesteps.long()
        else:  # a Python number is an integer timestep, as for UNet2DModel (517.6: 517; 999.99997: 999)
            timesteps = torch.as_tensor(timestep, dtype=torch.long, device=sample.device)
        self._check_inputs(sample, timesteps)
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timesteps.reshape(-1).expand(sample.shape[0])

        base = c.block_out_channels[0]
        emb = self.time_embedding(sinusoidal_embedding(timesteps, base, c.flip_sin_to_cos, c.freq_shift).to(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this model is class-conditional (class_embed_type/num_class_embeds set): pass class_labels.")
            if c.class_embed_type == "timestep":
                class_labels = sinusoidal_embedding(class_labels, base, c.flip_sin_to_cos, c.freq_shift)
            emb = emb + self.class_embedding(class_labels).to(self.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels were given but the model has no class embedding (set num_class_embeds).")
        temb_act = self.time_act(emb)  # every ResNet block projects act(emb); compute it once

        h = self.conv_in(sample)
        if h.device.type in self.channels_last_on:  # every later op keeps the layout; the output is contiguous
            h = h.contiguous(memory_format=torch.channels_last)
        skips: Tuple[torch.Tensor, ...] = (h,)
        for block in self.down_blocks:
            h, block_skips = block(h, temb_act)
            skips += block_skips
        if self.mid_block is not None:
            h = self.mid_block(h, temb_act)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], temb_act)
            skips = skips[:-n]
        out = self.conv_out(self.conv_act(self.conv_norm_out(h))).contiguous()
        return DDPMUNetOutput(sample=out) if return_dict else (out,)
