"""``auto`` dtype from the processor's flags: bf16 only where it runs natively."""

from __future__ import annotations

from service.__main__ import build_parser
from service.config import Settings
from service.hardware import auto_dtype, cpu_flags

ZEN3 = "processor : 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n"
ZEN5 = "processor : 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags : avx2 avx512f amx_tile amx_bf16 amx_int8\n"


def test_cpu_flags_reads_the_isa_extensions() -> None:
    assert cpu_flags(ZEN3) == ["sse4_2", "avx", "avx2", "fma", "f16c"]
    assert "avx512_bf16" in cpu_flags(ZEN5) and cpu_flags("no flags line") == []


def test_auto_is_bf16_only_with_native_bf16() -> None:
    assert auto_dtype("cpu", cpu_flags(ZEN3)) == "float32"  # emulated bf16: 0.3 GFLOP/s
    assert auto_dtype("cpu", cpu_flags(ZEN5)) == "bfloat16"
    assert auto_dtype("cpu", cpu_flags(SAPPHIRE_RAPIDS)) == "bfloat16"
    assert auto_dtype("cuda", []) == "bfloat16"


def test_settings_resolve_auto_for_this_machine() -> None:
    assert Settings(dtype="auto", device="cpu").resolved_dtype() == auto_dtype("cpu")
    assert Settings(dtype="float16").resolved_dtype() == "float16"


def test_auto_is_the_default_of_the_server_and_the_cli(monkeypatch) -> None:
    """bf16 is 1.9-3.4x float32 for 4-20 % more FLD on the default model (docs/benchmarks.md): default where native."""
    monkeypatch.delenv("DDPM_DTYPE", raising=False)
    assert Settings().dtype == "auto" and Settings(device="cpu").resolved_dtype() == auto_dtype("cpu")
    parser = build_parser()
    for argv in (["sample", "--out", "x.npy"], ["evaluate"], ["compile"]):
        assert parser.parse_args(argv).dtype == "auto"
