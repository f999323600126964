"""The engine benchmarks still run end to end (on the tiny random-weight model, seconds instead of minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.hardware import auto_dtype

REPO = Path(__file__).resolve().parents[1]
# bf16 runs emulated on CPUs without avx512_bf16/AMX (0.3 GFLOP/s on an AVX2 EPYC): the benches' bf16 defaults would
# take tens of minutes there
needs_native_bf16 = pytest.mark.skipif(auto_dtype("cpu") != "bfloat16",
                                       reason="this CPU has no native bf16 (avx512_bf16/AMX): bf16 runs emulated")


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=1200
    )  # generous: compiling and training even tiny models takes minutes on a slow 2-core CPU beside other tests
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_load_bench_replays_one_trace_in_both_modes(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    run_bench("load.py", "--model", str(tiny_model_dir), "--duration", "3", "--grace", "30", "--threads", "1",
              "--max-batch-rows", "8", "--calibration-work", "300", "--calibration-rounds", "2", "--json", str(out))
    result = json.loads(out.read_text())
    step, request = result["results"]
    assert (step["batching"], request["batching"]) == ("step", "request")
    for r in (step, request):
        assert r["requests"] > 0 and r["ok"] == r["requests"], r  # every request of the trace completed
        assert 0 < r["latency_p50_s"] <= r["latency_p99_s"]
        assert r["iterations"] > 0


@pytest.mark.slow
@needs_native_bf16
def test_offline_bench_compares_engine_and_diffusers(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    run_bench("engine_offline.py", "--model", str(tiny_model_dir), "--images", "4", "--batch", "2",
              "--ddim-steps", "3", "--ddpm-steps", "2", "--rounds", "2", "--threads", "1", "--json", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["gflop_per_image_step"] > 0 and result["bf16_gemm_gflops"] > 0
    assert sum(r["project_defaults"] for r in rows) == 1  # the engine eager row of the default dtype (no artifact)
    assert all(r["ceiling_fraction"] > 0 for r in rows)
    got = {(r["impl"], r["dtype"]) for r in rows}
    assert got == {(impl, dtype) for impl in ("diffusers", "engine") for dtype in ("fp32", "bf16")}  # none compiled
    for r in rows:
        assert r["ddim_images_per_s"] > 0 and r["ddpm_images_per_s"] > 0 and len(r["ddpm_step_s_rounds"]) == 2


@pytest.mark.slow
def test_offline_bench_profiles_and_scales_a_forward(tiny_model_dir: Path) -> None:
    profiled = run_bench("engine_offline.py", "--model", str(tiny_model_dir), "--batch", "4", "--threads", "1",
                         "--profile").stdout
    assert "| diffusers fp32 |" in profiled and "| engine bf16 |" in profiled
    scaled = run_bench("engine_offline.py", "--model", str(tiny_model_dir), "--threads", "1", "--scaling", "1,2").stdout
    assert "| 1 |" in scaled and "| 2 |" in scaled


@pytest.mark.slow
def test_omp_teams_bench_runs_every_scenario(tiny_model_dir: Path) -> None:
    table = run_bench("omp_teams.py", "--model", str(tiny_model_dir), "--rows", "2", "--threads", "1",
                      "--forwards", "3", "--repeats", "1").stdout
    for label in ("| main |", "| worker, main ran a multi-threaded op |", "| worker, main kept at 1 thread |",
                  "| worker, another thread holds an idle team |"):
        assert label in table, table


MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason=f"MNIST digits not found at {MNIST}")
def test_sampler_quality_bench_scores_each_point_and_plots(tmp_path: Path) -> None:
    import torch

    from service.diffusion.checkpoint import ModelSpec, save_model
    from service.diffusion.unet import UNet
    from tests.conftest import tiny_unet_config

    torch.manual_seed(0)
    spec = ModelSpec(name="random28", unet=tiny_unet_config(size=28))
    spec.extra = {"training": {"holdout": 1000, "split_seed": 0},
                  "data": {"source": str(MNIST / "t10k-images-idx3-ubyte.gz")}}
    model = save_model(spec, UNet(spec.unet), tmp_path / "random28")
    (model / "classifier.safetensors").write_bytes((REPO / "model_store/mnist/classifier.safetensors").read_bytes())
    out, plot = tmp_path / "q.json", tmp_path / "q.png"
    args = ["--model", str(model), "--configs", "dpmpp_2m:karras,ddim", "--steps", "2,3", "--num", "20",
            "--batch", "10", "--threads", "1", "--json", str(out), "--plot", str(plot)]
    table = run_bench("sampler_quality.py", *args).stdout
    points = json.loads(out.read_text())["points"]
    assert {(p["sampler"], p["spacing"], p["steps"]) for p in points} == {
        ("dpmpp_2m", "karras", 2), ("dpmpp_2m", "karras", 3), ("ddim", "leading", 2), ("ddim", "leading", 3)}
    for p in points:
        assert p["num"] == 20 and p["fld"] > 0 and p["floor_fld"] > 0 and p["images_per_s"] > 0 and p["novelty"] > 0
    assert "| dpmpp_2m | karras | 3 | 20 |" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --resume keeps the measured points and measures only the new ones
    again = run_bench("sampler_quality.py", *args[:-4], "--steps", "2", "--json", str(out), "--plot", str(plot),
                      "--resume").stdout
    assert "FLD" not in again.split("|")[0]  # nothing re-measured: no progress line before the table
    # --eps-scales measures each point at each λ (the sampler steps with ε_θ/λ) and plots FLD against λ
    scaled, eps_plot = tmp_path / "eps.json", tmp_path / "eps.png"
    run_bench("sampler_quality.py", *args[:4], "--steps", "2", "--num", "20", "--batch", "10", "--threads", "1",
              "--json", str(scaled), "--plot", str(plot), "--eps-scales", "0.9,1,0.9:1", "--eps-plot", str(eps_plot))
    points = json.loads(scaled.read_text())["points"]
    assert sorted((p["sampler"], str(p["eps_scale"])) for p in points) == [
        ("ddim", "0.9"), ("ddim", "1.0"), ("ddim", "[0.9, 1.0]"),
        ("dpmpp_2m", "0.9"), ("dpmpp_2m", "1.0"), ("dpmpp_2m", "[0.9, 1.0]")]
    assert len({p["fld"] for p in points}) == 6  # λ, and λ_t linear in t, change the images
    assert eps_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_training_curve_plots_a_runs_loss_log(tmp_path: Path) -> None:
    import numpy as np

    from service.train import TrainConfig, train

    data = tmp_path / "bars.npz"
    bars = np.zeros((8, 8, 8), np.uint8)
    for i in range(8):
        bars[i, i, :] = 255
    np.savez(data, images=bars)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "m"), workdir=str(tmp_path / "w"), image_size=8,
                      block_out_channels=(8, 16), attention_levels=(1,), norm_num_groups=4, batch_size=4, steps=12,
                      holdout=0, sample_every=0, checkpoint_every=100, log_every=2, threads=1,
                      lr_schedule="cosine", warmup_steps=2)
    train(cfg, log=lambda *_: None)
    out = tmp_path / "curve.png"
    assert "wrote" in run_bench("training_curve.py", "--workdir", str(tmp_path / "w"), "--out", str(out)).stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run([sys.executable, "bench/training_curve.py", "--workdir", str(tmp_path / "w"), "--out",
                           str(out), "--snapshots"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--classifier" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").is_file(), reason=f"MNIST training split not at {MNIST}")
@needs_native_bf16
def test_recipe_ablation_trains_and_scores_each_arm_and_resumes(tmp_path: Path) -> None:
    out, plot = tmp_path / "a.json", tmp_path / "a.png"
    common = ["--data", str(MNIST / "train-images-idx3-ubyte.gz"), "--classifier",
              str(REPO / "model_store/mnist/classifier.safetensors"), "--workdir", str(tmp_path / "runs"),
              "--steps", "4", "--batch-size", "4", "--warmup-steps", "2", "--num", "20", "--batch", "10",
              "--threads", "1", "--json", str(out), "--plot", str(plot)]
    table = run_bench("recipe_ablation.py", *common, "--arms", "base,batch-double").stdout
    arms = {a["arm"]: a for a in json.loads(out.read_text())["arms"]}
    assert set(arms) == {"base", "batch-double"}
    assert arms["base"]["config"]["min_snr_gamma"] == 5.0 and arms["base"]["changes"] == {}
    doubled = arms["batch-double"]["config"]
    assert (doubled["batch_size"], doubled["steps"]) == (8, 2)  # the same images seen as the base arm
    assert arms["base"]["images_seen"] == arms["batch-double"]["images_seen"] == 16
    for a in arms.values():
        assert [(p["sampler"], p["steps"], p["num"]) for p in a["points"]] == [("dpmpp_2m_sde", 20, 20),
                                                                               ("ddim", 50, 20)]
        assert all(p["fld"] > 0 and p["floor_fld"] > 0 for p in a["points"]) and a["test_eps_mse"] > 0
    assert "| batch-double | batch_size=8, steps=2, warmup_steps=1 | 2 × 8 |" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # arms already in the JSON are kept; only the new one trains
    again = run_bench("recipe_ablation.py", *common, "--arms", "base,plain-mse").stdout
    assert "trained" in again and again.count("trained") == 1
    arms = {a["arm"]: a for a in json.loads(out.read_text())["arms"]}
    assert list(arms) == ["base", "plain-mse", "batch-double"]  # in the script's arm order
    assert arms["plain-mse"]["config"]["min_snr_gamma"] == 0.0
