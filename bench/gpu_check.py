"""Everything a GPU check needs, in one run of at most ~8 minutes; the report goes to a folder.

    python3 bench/gpu_check.py --out $OUT/gpu            # on a lent GPU machine, from the repository root

1. Environment: torch, CUDA, the GPU.
2. The tests that mean something on CUDA (``tests/cuda``: graph replay = eager, padded rows never returned,
   engine determinism on the GPU; ``tests/diffusion/test_graphs.py``), with pytest.
3. UNet throughput of the default model (image-steps/s) at batch 1/16/64/256: eager fp32, eager bf16 and fp16
   autocast, CUDA graphs in bf16 and fp16 (what the engine runs), and diffusers' ``UNet2DModel`` on the same
   weights in fp16 (when diffusers is importable).
4. The step-level vs request-level load test (``bench/load.py``) on the GPU, short.

Each part has a time budget and the report says what ran; a part that fails is recorded, the rest still run.
The GPU machine has torch but none of fastapi/uvicorn/pydantic-settings/diffusers: parts 2–4 need only torch,
numpy, safetensors, pillow and prometheus-client (all there); diffusers is optional (carry its wheel, see
/work/.library/device/README.md). ``--device cpu`` dry-runs the script here with tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from service.diffusion.checkpoint import DiffusionModel, load_model  # noqa: E402
from service.diffusion.graphs import BucketedForward  # noqa: E402
from service.diffusion.rows import predict_eps  # noqa: E402


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "capability": f"sm_{props.major}{props.minor}",
                 "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}
    return info


def run_tests(out: Path, budget_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda",
           "tests/diffusion/test_graphs.py"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired as exc:
        (out / "tests.log").write_text(str(exc.stdout or ""))
        return {"status": "timeout", "seconds": budget_s}
    (out / "tests.log").write_text(done.stdout + done.stderr)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return {"status": "passed" if done.returncode == 0 else "failed", "summary": summary,
            "seconds": round(time.perf_counter() - start, 1)}


def timed(fn, sync, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after two warm-ups."""
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variants(model: DiffusionModel, device: torch.device, max_rows: int) -> dict:
    """name → ε_θ(x, t) callables, the graph ones captured up to ``max_rows`` rows."""
    unet = model.unet
    shape = (model.spec.channels, model.spec.image_size, model.spec.image_size)
    out = {f"eager {name}": (lambda x, t, d=d: predict_eps(unet, x, t, d))
           for name, d in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
    if device.type == "cuda":
        for name, d in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            graphed = BucketedForward(lambda x, t, d=d: predict_eps(unet, x, t, d), shape, max_rows, device)
            graphed.capture()
            out[f"graphs {name}"] = graphed
    try:
        from diffusers import UNet2DModel

        ref = UNet2DModel(**model.spec.unet.to_dict())
        ref.load_state_dict(unet.state_dict(), strict=True)
        ref = ref.to(device, torch.float16).eval()

        def diffusers_fp16(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return ref(x.half(), t).sample.float()

        out["diffusers fp16"] = diffusers_fp16
    except ImportError:
        pass
    return out


def throughput(model: DiffusionModel, device: torch.device, batches: list[int], reps: int) -> list[dict]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = (model.spec.channels, model.spec.image_size, model.spec.image_size)
    rows = []
    for name, fn in variants(model, device, max(batches)).items():
        for b in batches:
            x = torch.randn((b, *shape), device=device)
            t = torch.randint(0, model.spec.num_train_timesteps, (b,), device=device)
            seconds = timed(lambda fn=fn, x=x, t=t: fn(x, t), sync, reps)
            rows.append({"variant": name, "batch": b, "ms": round(seconds * 1e3, 3),
                         "image_steps_per_s": round(b / seconds, 1)})
            print(f"{name:16s} batch {b:4d}: {seconds * 1e3:8.3f} ms  {b / seconds:10.0f} image-steps/s", flush=True)
    return rows


def load_test(args: argparse.Namespace, out: Path, budget_s: float) -> dict:
    report = out / "load.json"
    cmd = [sys.executable, "bench/load.py", "--model", args.model, "--device", args.device, "--dtype", "bfloat16",
           "--duration", str(args.load_duration), "--grace", "20", "--max-batch-rows", str(max(args.batches)),
           "--steps", "10,20,50", "--images", ",".join(str(i) for i in (1, 4, 16) if i <= max(args.batches)),
           "--calibration-work", str(args.calibration_work),
           "--json", str(report)]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": budget_s}
    (out / "load.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"status": "failed", "tail": (done.stdout + done.stderr)[-2000:]}
    data = json.loads(report.read_text())
    return {"status": "ok", "capacity_image_steps_per_s": data["capacity"],
            "results": [{k: r[k] for k in ("batching", "ok", "rejected", "unfinished", "latency_p50_s",
                                             "latency_p99_s", "throughput_images_per_s")} for r in data["results"]]}


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['environment'].get('gpu', report['environment']['device'])})", "",
             f"environment: `{json.dumps(report['environment'])}`", "", f"tests: {report['tests']}", "",
             "| variant | batch | ms / forward | image-steps/s |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['batch']} | {r['ms']} | {r['image_steps_per_s']} |" for r in report["throughput"]]
    lines += ["", f"load test: `{json.dumps(report['load'])}`", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.md, logs)")
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--load-duration", type=float, default=60.0)
    p.add_argument("--calibration-work", type=int, default=20000)
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    device = torch.device(args.device)
    report: dict = {"environment": environment(args.device), "command": " ".join(sys.argv)}
    print(json.dumps(report["environment"]), flush=True)
    report["tests"] = {"status": "skipped"} if args.skip_tests else run_tests(args.out, budget_s=150)
    print(f"tests: {report['tests']}", flush=True)
    model = load_model(args.model, device)
    try:
        report["throughput"] = throughput(model, device, args.batches, args.reps)
    except Exception as exc:  # recorded: the other parts still run
        report["throughput"], report["throughput_error"] = [], repr(exc)
    report["load"] = load_test(args, args.out, budget_s=args.load_duration + 150)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
