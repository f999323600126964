"""The DDPM noise-prediction UNet (Ho et al. 2020, appendix B; PixelCNN++-style backbone).

A time-conditioned UNet ε_θ(x_t, t): sinusoidal timestep embedding → MLP, residual blocks with a
per-channel projection of the embedding, GroupNorm + SiLU, single- or multi-head self-attention
at chosen resolutions, strided-conv downsampling and nearest+conv upsampling, skip connections
from every down-path output to the up path.

Config fields and state-dict keys follow diffusers' ``UNet2DModel`` for the DDPM family
(``DownBlock2D``/``AttnDownBlock2D``/``UpBlock2D``/``AttnUpBlock2D``), so weights of e.g.
google/ddpm-cifar10-32 load with ``strict=True`` (see :func:`convert_legacy_attention_keys`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "UNetConfig", "convert_legacy_attention_keys", "timestep_embedding"]

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


@dataclass
class UNetConfig:
    sample_size: int = 28  # image height = width, in pixels
    in_channels: int = 1  # image channels in
    out_channels: int = 1  # predicted ε channels out
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # channels of each resolution level
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1  # residual blocks per down level (up levels get one more)
    attention_head_dim: int | None = None  # channels per attention head; None = one head
    norm_num_groups: int = 8  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm epsilon
    freq_shift: int = 0  # denominator shift of the sinusoid frequencies (DDPM: 1)
    flip_sin_to_cos: bool = True  # embedding order [cos, sin] instead of [sin, cos] (DDPM: False)
    downsample_padding: int = 1  # 0 = pad right/bottom by one then stride-2 conv (DDPM)
    mid_block_scale_factor: float = 1.0  # residual output scale of the middle block
    dropout: float = 0.0  # dropout inside residual blocks (training only)
    center_input_sample: bool = False  # map inputs from [0, 1] to [-1, 1] first

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("block_out_channels, down_block_types and up_block_types differ in length")
        bad = [b for b in self.down_block_types if b not in DOWN_BLOCKS]
        bad += [b for b in self.up_block_types if b not in UP_BLOCKS]
        if bad:
            raise ValueError(f"unsupported block types {bad}; supported: {DOWN_BLOCKS + UP_BLOCKS}")

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Build from a (diffusers) config dict, rejecting features this UNet does not implement."""
        unsupported = {
            "time_embedding_type": "positional",
            "act_fn": "silu",
            "resnet_time_scale_shift": "default",
            "class_embed_type": None,
            "num_class_embeds": None,
            "downsample_type": "conv",
            "upsample_type": "conv",
            "attn_norm_num_groups": None,
            "add_attention": True,
            "mid_block_type": "UNetMidBlock2D",
            "time_embedding_dim": None,
        }
        for key, expected in unsupported.items():
            if key in d and d[key] != expected:
                raise ValueError(f"UNet option {key}={d[key]!r} is not supported (only {expected!r})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def timestep_embedding(
    t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> torch.Tensor:
    """Transformer sinusoidal embedding of the timesteps (DDPM appendix B), shape (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Linear → SiLU → Linear."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that sidesteps PyTorch's slow CPU kernel for small channels_last feature maps.

    For a channels_last input with H·W < 1024, ATen's CPU kernel parallelises over (batch, group)
    and walks C/G channels at a time; with fewer than 16 channels per group that runs ~5-10× slower
    than the contiguous kernel (e.g. 5 ms vs 0.6 ms for bf16 (32, 64, 28, 28), 8 groups). Such
    inputs are normalised in contiguous layout and handed back as channels_last. Values are the
    same kernel's; contiguous (default fp32) inputs take the plain path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        if h * w < 1024 and c // self.num_groups < 16 and not x.is_contiguous():
            out = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return out.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x / factor``, skipping the elementwise pass when the factor is 1 (the DDPM default)."""
    return x if factor == 1.0 else x / factor


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv, + projected time embedding, GroupNorm → SiLU → dropout → conv, + skip."""

    def __init__(
        self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float, dropout: float,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return _scaled(skip + h, self.output_scale_factor)


class Attention(nn.Module):
    """Self-attention over the H·W positions with a GroupNorm in front and a residual around."""

    def __init__(
        self, ch: int, head_dim: int | None, groups: int, eps: float, rescale_output_factor: float = 1.0
    ) -> None:
        super().__init__()
        self.heads = ch // head_dim if head_dim else 1
        self.group_norm = GroupNorm(groups, ch, eps=eps)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch), nn.Dropout(0.0)])
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)

        def split(proj: nn.Linear) -> torch.Tensor:
            return proj(seq).reshape(b, h * w, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, HW, d)

        out = F.scaled_dot_product_attention(split(self.to_q), split(self.to_k), split(self.to_v))
        out = out.transpose(1, 2).reshape(b, h * w, c)  # (B, HW, C)
        out = self.to_out[1](self.to_out[0](out))
        out = out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return _scaled(out + x, self.rescale_output_factor)


class Downsample2D(nn.Module):
    def __init__(self, ch: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # asymmetric padding of the original DDPM code
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """``layers`` residual blocks (each followed by attention if ``attn``), then an optional downsample."""

    def __init__(
        self, cfg: UNetConfig, in_ch: int, out_ch: int, temb_ch: int, attn: bool, downsample: bool
    ) -> None:
        super().__init__()
        g, e, n = cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, g, e, cfg.dropout) for i in range(n)
        )
        self.attentions = (
            nn.ModuleList(Attention(out_ch, cfg.attention_head_dim, g, e) for _ in range(n)) if attn else None
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)]) if downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """``layers + 1`` residual blocks on [x, skip] concatenations (+ attention), then an optional upsample."""

    def __init__(
        self, cfg: UNetConfig, in_ch: int, prev_ch: int, out_ch: int, temb_ch: int, attn: bool, upsample: bool
    ) -> None:
        super().__init__()
        g, e, n = cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (prev_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch), out_ch, temb_ch, g, e, cfg.dropout
            )
            for i in range(n)
        )
        self.attentions = (
            nn.ModuleList(Attention(out_ch, cfg.attention_head_dim, g, e) for _ in range(n)) if attn else None
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)  # (B, C + C_skip, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Residual block → attention → residual block at the lowest resolution."""

    def __init__(self, cfg: UNetConfig, ch: int, temb_ch: int) -> None:
        super().__init__()
        g, e, s = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        head_dim = cfg.attention_head_dim
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb_ch, g, e, cfg.dropout, s) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(ch, head_dim, g, e, s)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    """ε_θ(x_t, t) for images (B, C, H, W) in [-1, 1] and integer timesteps t of shape (B,)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        chs = config.block_out_channels
        temb_ch = chs[0] * 4
        self.conv_in = nn.Conv2d(config.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb_ch)

        self.down_blocks = nn.ModuleList()
        prev = chs[0]
        for i, (ch, kind) in enumerate(zip(chs, config.down_block_types, strict=True)):
            final = i == len(chs) - 1
            self.down_blocks.append(DownBlock(config, prev, ch, temb_ch, kind == "AttnDownBlock2D", not final))
            prev = ch

        self.mid_block = MidBlock(config, chs[-1], temb_ch)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chs))
        out_ch = rev[0]
        for i, kind in enumerate(config.up_block_types):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, len(rev) - 1)]
            final = i == len(rev) - 1
            self.up_blocks.append(
                UpBlock(config, in_ch, prev_ch, out_ch, temb_ch, kind == "AttnUpBlock2D", not final)
            )

        self.conv_norm_out = GroupNorm(config.norm_num_groups, chs[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.to(self.conv_in.weight.dtype))  # (B, 4·C0)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb)
            skips.extend(block_skips)
        h = self.mid_block(h, temb)
        for block in self.up_blocks:
            h = block(h, skips, temb)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


_LEGACY_ATTENTION_KEYS = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def convert_legacy_attention_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename pre-0.14 diffusers attention keys (``…attentions.0.query.weight``) to current ones."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION_KEYS:
            key = ".".join([*parts[:-2], _LEGACY_ATTENTION_KEYS[parts[-2]], parts[-1]])
        out[key] = value
    return out
