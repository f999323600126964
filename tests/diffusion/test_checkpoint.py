import json
from pathlib import Path

import pytest
import torch

from service.diffusion.checkpoint import CheckpointError, ModelSpec, load_model, save_model
from service.diffusion.unet import UNet


def test_roundtrip_keeps_weights_and_spec(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    assert model.spec.name == "tiny"
    assert model.spec.beta_end == 0.02
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["weights"]["sha256"] == model.sha256
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 999])
    assert model.unet(x, t).shape == (2, 1, 8, 8)


def test_tampered_weights_are_refused_with_both_hashes(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    expected = json.loads((tiny_model_dir / "config.json").read_text())["weights"]["sha256"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_model(tiny_model_dir)
    msg = str(err.value)
    assert str(weights) in msg and expected in msg and "sha256 mismatch" in msg


def test_sampling_settings_round_trip_and_bad_ones_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_model_dir)
    sampling = {"timestep_spacing": {"ddim": "trailing", "unipc": "karras"}, "steps_offset": 1}
    spec = ModelSpec(name="tiny", unet=model.spec.unet, sampling=sampling)
    loaded = load_model(save_model(spec, UNet(spec.unet), tmp_path / "m"))
    assert loaded.spec.sampling == sampling and loaded.spec.options.steps_offset == 1
    assert [loaded.spec.default_spacing(n) for n in ("ddim", "unipc", "ddpm")] == ["trailing", "karras", "leading"]
    scaled = ModelSpec(name="tiny", unet=model.spec.unet, sampling={"eps_scale": {"ddim": 0.98}})
    assert (scaled.eps_scale("ddim"), scaled.eps_scale("ddpm"), loaded.spec.eps_scale("ddim")) == (0.98, 1.0, 1.0)
    assert ModelSpec(name="tiny", unet=model.spec.unet, sampling={"eps_scale": 0.99}).eps_scale("unipc") == 0.99
    linear = ModelSpec(name="tiny", unet=model.spec.unet, sampling={"eps_scale": {"ddim": [0.97, 0.99]}})
    assert (linear.eps_scale("ddim"), linear.eps_scale("unipc")) == ((0.97, 0.99), 1.0)
    for bad, message in (({"variance_type": "fixed_large"}, "unknown sampling settings"),
                         ({"timestep_spacing": {"ddim": "karras"}}, "not supported by 'ddim'"),
                         ({"timestep_spacing": {"euler": "linspace"}}, "unknown sampler 'euler'"),
                         ({"timestep_spacing": "logsnr"}, "not supported by 'ddpm'"),
                         ({"eps_scale": {"euler": 0.98}}, "unknown sampler 'euler'"),
                         ({"eps_scale": 0}, r"in \[0.5, 2\]"),
                         ({"eps_scale": {"ddim": "0.98"}}, r"in \[0.5, 2\]"),
                         ({"eps_scale": {"ddim": [0.97, 0.98, 0.99]}}, r"in \[0.5, 2\]"),
                         ({"eps_scale": {"ddim": [0.97, 3]}}, r"in \[0.5, 2\]")):
        with pytest.raises(CheckpointError, match=message):
            ModelSpec(name="tiny", unet=model.spec.unet, sampling=bad)
