"""The AOTInductor artifact: compile → load → equal to eager (batch 1, sizes never seen); stale ones ignored."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from service.diffusion.checkpoint import load_model, save_model
from service.diffusion.compiled import artifact_paths
from service.diffusion.pipeline import sample
from service.diffusion.runner import UNetRunner
from tests.conftest import COMPILED_ROWS

pytestmark = pytest.mark.slow  # the shared artifact takes about a minute to build

TOLERANCE = 1e-4  # float32: compiled vs eager ε, max abs difference (measured ~1e-6)


def _runner(folder: Path, rows: int = COMPILED_ROWS, dtype: torch.dtype = torch.float32) -> UNetRunner:
    runner = UNetRunner(load_model(folder), dtype)
    runner.prepare(rows)
    return runner


@pytest.mark.parametrize("rows", [1, 5, 11, COMPILED_ROWS])  # the export's example had 8 rows
def test_compiled_unet_equals_eager_at_any_batch_size(compiled_model_dir: Path, rows: int) -> None:
    runner = _runner(compiled_model_dir)
    assert runner.compiled
    x, t = torch.randn(rows, 1, 16, 16), torch.randint(0, 1000, (rows,))
    with torch.inference_mode():
        expected = runner.model.unet(x, t)
    torch.testing.assert_close(runner(x, t), expected, atol=TOLERANCE, rtol=0)


def test_sampling_with_the_compiled_unet_gives_the_eager_images(compiled_model_dir: Path) -> None:
    runner = _runner(compiled_model_dir)
    got = sample(runner.model, 3, 5, "unipc", 8, forward=runner)
    torch.testing.assert_close(got, sample(runner.model, 3, 5, "unipc", 8), atol=1e-4, rtol=0)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_artifact_of_other_weights_is_ignored_with_a_log_line(
    compiled_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _copy(compiled_model_dir, tmp_path / "other")
    model = load_model(folder)
    with torch.no_grad():
        next(model.unet.parameters()).add_(0.5)
    save_model(model.spec, model.unet, folder)  # new weights, new sha256; compiled/ left as it was
    with caplog.at_level(logging.WARNING):
        runner = _runner(folder)
    assert not runner.compiled
    [line] = [r.getMessage() for r in caplog.records if "ignoring compiled UNet" in r.getMessage()]
    assert "weights_sha256 differs" in line


def test_artifact_recorded_for_another_dtype_or_fewer_rows_is_ignored(
    compiled_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _copy(compiled_model_dir, tmp_path / "dtype")
    cpu = torch.device("cpu")
    for src, dst in zip(artifact_paths(folder, cpu, torch.float32), artifact_paths(folder, cpu, torch.bfloat16),
                        strict=True):
        shutil.copy(src, dst)  # a float32 artifact under the bfloat16 name
    with caplog.at_level(logging.WARNING):
        assert not _runner(folder, dtype=torch.bfloat16).compiled
        assert not _runner(folder, rows=COMPILED_ROWS * 2).compiled
    lines = [r.getMessage() for r in caplog.records if "ignoring compiled UNet" in r.getMessage()]
    assert len(lines) == 2 and "dtype differs" in lines[0] and "at most 16 rows" in lines[1]


def test_artifact_for_another_cpu_or_torch_is_ignored(compiled_model_dir: Path, tmp_path: Path) -> None:
    for field, value in (("isa_flags", ["avx512f", "amx_bf16"]), ("torch", "2.0.0"), ("capability", "another")):
        folder = _copy(compiled_model_dir, tmp_path / field)
        meta = artifact_paths(folder, torch.device("cpu"), torch.float32)[1]
        recorded = json.loads(meta.read_text())
        if field == "capability":  # the other of two real ones, whichever this machine is not
            value = "AVX2" if recorded[field] != "AVX2" else "AVX512"
        meta.write_text(json.dumps({**recorded, field: value}))
        assert not _runner(folder).compiled, field


def test_an_artifact_that_disagrees_with_eager_is_dropped(compiled_model_dir: Path) -> None:
    runner = UNetRunner(load_model(compiled_model_dir), torch.float32)
    runner.prepare(COMPILED_ROWS, tolerance=-1.0)  # nothing passes: eager
    assert not runner.compiled


def test_compiled_off_runs_eager(compiled_model_dir: Path) -> None:
    runner = UNetRunner(load_model(compiled_model_dir), torch.float32, compiled="off")
    runner.prepare(COMPILED_ROWS)
    assert not runner.compiled
