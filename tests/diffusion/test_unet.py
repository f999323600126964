"""Our DDPM UNet against diffusers' UNet2DModel (test-only oracle) on the same random weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding

from service.diffusion.unet import GroupNorm, UNet, UNetConfig, convert_legacy_attention_keys, timestep_embedding
from tests.conftest import SMALL_DDPM_UNET, UNET_CONFIGS

# google/ddpm-cifar10-32 (Ho et al. 2020, appendix B): 35.7M parameters, attention at 16×16, one head.
CIFAR10 = UNET_CONFIGS["cifar10"]
# the project's 28×28 model: (32, 64, 128), one block per level, attention at 7×7
SMALL = SMALL_DDPM_UNET
# diffusers' defaults for the options the DDPM config sets otherwise, and two attention heads
SMALL_DEFAULTS = {
    **SMALL,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "downsample_padding": 1,
    "norm_eps": 1e-5,
    "attention_head_dim": 64,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}


def random_reference(config: dict, seed: int = 0) -> UNet2DModel:
    """A diffusers UNet2DModel with random weights; norms and biases perturbed so none is trivially 1 or 0."""
    torch.manual_seed(seed)
    ref = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def ours_from(ref: UNet2DModel, state: dict[str, torch.Tensor] | None = None) -> UNet:
    unet = UNet(UNetConfig.from_dict(dict(ref.config))).eval()
    unet.load_state_dict(state if state is not None else ref.state_dict(), strict=True)
    return unet


def _compare(config: dict, batch: int = 3) -> float:
    ref = random_reference(config)
    ours = ours_from(ref)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    gen = torch.Generator().manual_seed(1)
    size, ch = config["sample_size"], config["in_channels"]
    x = torch.randn(batch, ch, size, size, generator=gen)
    t = torch.tensor([0, 517, 999, 3, 250][:batch])  # a different timestep per row
    with torch.inference_mode():
        expected = ref(x, t).sample
        out = ours(x, t)
    assert out.shape == expected.shape == x.shape
    assert expected.abs().mean() > 0.05  # a real signal, not a zero output
    diff = (out - expected).abs().max().item()
    assert diff <= 1e-4, diff
    return diff


@pytest.mark.slow
def test_cifar10_config_equals_diffusers() -> None:
    _compare(CIFAR10, batch=2)


@pytest.mark.parametrize("config", [SMALL, SMALL_DEFAULTS], ids=["ddpm-options", "diffusers-defaults-2-heads"])
def test_small_config_equals_diffusers(config: dict) -> None:
    _compare(config)


def test_scalar_timestep_broadcasts_like_diffusers() -> None:
    ref = random_reference(SMALL)
    ours = ours_from(ref)
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x, torch.tensor(321)), ref(x, 321).sample, rtol=0, atol=1e-4)


def test_legacy_attention_key_names_load() -> None:
    """Pre-0.14 diffusers checkpoints name attention projections query/key/value/proj_attn."""
    ref = random_reference(SMALL)
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
            if ".attentions." in key and new in key:
                key = key.replace(new, old)
        legacy[key] = value
    assert any(".query." in k for k in legacy) and any(".proj_attn." in k for k in legacy)
    with pytest.raises(RuntimeError):
        UNet(UNetConfig.from_dict(dict(ref.config))).load_state_dict(legacy, strict=True)
    ours = ours_from(ref, convert_legacy_attention_keys(legacy))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 900])
    with torch.inference_mode():
        torch.testing.assert_close(ours(x, t), ref(x, t).sample, rtol=0, atol=1e-4)


def test_strict_load_rejects_a_mismatched_config() -> None:
    ref = random_reference(SMALL)
    other = UNet(UNetConfig.from_dict({**dict(ref.config), "layers_per_block": 2}))
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize(("flip", "shift"), [(False, 1), (True, 0), (False, 0), (True, 1)])
@pytest.mark.parametrize("dim", [32, 128, 33])
def test_timestep_embedding_equals_diffusers(flip: bool, shift: int, dim: int) -> None:
    t = torch.tensor([0, 1, 17, 500, 999])
    torch.testing.assert_close(
        timestep_embedding(t, dim, flip, shift),
        get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("resnet_time_scale_shift", "scale_shift"),
        ("act_fn", "gelu"),
        ("time_embedding_type", "fourier"),
        ("class_embed_type", "timestep"),
        ("add_attention", False),
        ("mid_block_type", None),
        ("time_embedding_dim", 256),
    ],
)
def test_unsupported_diffusers_options_are_rejected(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict({**SMALL, key: value})


def test_config_round_trips_through_dict() -> None:
    cfg = UNetConfig.from_dict(SMALL)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unsupported block types"):
        UNetConfig.from_dict({**SMALL, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")})
    with pytest.raises(ValueError, match="differ in length"):
        UNetConfig.from_dict({**SMALL, "block_out_channels": (32, 64)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "groups"), [((2, 16, 7, 7), 4), ((2, 64, 14, 14), 8), ((1, 64, 32, 32), 2)])
def test_group_norm_is_layout_independent(dtype: torch.dtype, shape: tuple[int, ...], groups: int) -> None:
    """Our GroupNorm (contiguous kernel for small channels_last maps) equals nn.GroupNorm in both layouts."""
    ours, ref = GroupNorm(groups, shape[1], eps=1e-6), torch.nn.GroupNorm(groups, shape[1], eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape).to(dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    expected = ref.to(dtype)(x)
    cl = torch.channels_last
    for inp in (x, x_cl):
        out = ours.to(dtype)(inp)
        assert out.is_contiguous(memory_format=cl) == inp.is_contiguous(memory_format=cl)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
