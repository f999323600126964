"""Service settings, read from ``DDPM_*`` environment variables (pydantic-settings).

Every field maps to ``DDPM_<FIELD>`` (case-insensitive), e.g. ``DDPM_MAX_BATCH_ROWS=32``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Configuration of one service process; ``Settings()`` reads the environment."""

    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore", protected_namespaces=())

    # model
    model: str = Field("model_store/mnist", description="model-store entry or diffusers UNet2DModel folder")
    models: str | None = Field(
        None,
        description="several models in one server: a comma list of model folders, or one model-repository folder "
        "whose sub-folders are models; the first is the default. Unset: DDPM_MODEL alone",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available, else CPU")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="UNet compute dtype; auto = bfloat16 on CUDA and CPUs with avx512_bf16/AMX, else float32"
    )
    examples_dir: str | None = Field(
        None, description="example PNGs for GET /noise of the default model; default <model>/examples"
    )
    # server
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line (log shippers)")
    drain_timeout_s: float = Field(60.0, gt=0, description="SIGTERM: how long in-flight requests may run")
    max_connections: int = Field(
        1000, ge=1, description="open connections + running requests past which uvicorn answers 503 (limit_concurrency)"
    )
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this many seconds")
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="proxies whose X-Forwarded-For sets the client address (comma list, or *)"
    )
    # authentication (service/api/auth.py); keys are secrets: SecretStr keeps them out of repr and logs
    api_keys: SecretStr | None = Field(None, description="comma-separated API keys; when set, Bearer auth is on")
    api_keys_file: Path | None = Field(None, description="file of API keys, one per line (# comments, blanks ignored)")
    auth: Literal["auto", "none"] = Field("auto", description="none: allow a non-loopback bind without keys")
    metrics_auth: bool = Field(False, description="GET /metrics needs a key too (when keys are configured)")
    # engine
    max_batch_rows: int = Field(64, ge=1, description="rows (images) per UNet forward")
    max_queue_rows: int = Field(512, ge=1, description="rows admitted (queued + running); beyond → 429")
    max_rows_per_client: int = Field(
        0, ge=0, description="one client's queued + running rows; beyond → 429 (0 = half the queue, >= one batch)"
    )
    request_timeout_s: float = Field(300.0, gt=0, description="deadline per request; past it → 504")
    batching: Literal["step", "request"] = Field("step", description="step-level continuous or per-request")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0 = torch default)")
    model_sharing: Literal["threads", "worker"] = Field(
        "threads", description="several models: threads = each engine computes on its own worker thread (all threads "
        "each); worker = one shared device thread runs every engine's forwards in turn (bench/multi_model.py)"
    )
    cuda_graphs: bool = Field(True, description="CUDA: replay the UNet from CUDA graphs (one per batch-size bucket)")
    compiled: Literal["auto", "off"] = Field(
        "auto", description="auto: the model's compiled UNet (python -m service compile) when valid; off: eager"
    )
    # requests
    max_images_per_request: int = Field(16, ge=1, description="upper bound of num_images")
    max_upload_bytes: int = Field(5 * 1024 * 1024, ge=1, description="request bodies above this → 413")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="uploaded images above this many pixels → 400")
    preview_every: int = Field(0, ge=0, description="SSE preview every k steps; 0 = about 10 per request")
    sse_keep_alive_s: float = Field(
        15.0, gt=0, description="SSE: a ': keep-alive' comment after this many seconds without an event (proxies)"
    )

    def resolved_device(self) -> str:
        """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        """``auto`` → :func:`service.hardware.auto_dtype` for the resolved device; others as given."""
        if self.dtype != "auto":
            return self.dtype
        from service.hardware import auto_dtype

        return auto_dtype(self.resolved_device())

    def resolved_api_keys(self) -> tuple[str, ...]:
        """The keys of ``api_keys`` and ``api_keys_file`` (stripped, deduplicated); OSError if the file is unreadable,
        ValueError if a configured file holds no key."""
        keys = [k.strip() for k in (self.api_keys.get_secret_value() if self.api_keys else "").split(",")]
        if self.api_keys_file is not None:
            lines = [line.strip() for line in self.api_keys_file.read_text(encoding="utf-8").splitlines()]
            from_file = [line for line in lines if line and not line.startswith("#")]
            if not from_file:
                raise ValueError(f"DDPM_API_KEYS_FILE {self.api_keys_file} contains no key")
            keys += from_file
        return tuple(dict.fromkeys(k for k in keys if k))

    def model_paths(self) -> list[Path]:
        """The served model folders, default first: ``models`` (a comma list, or one folder of model folders,
        scanned in name order), else ``model``. ValueError for an empty list or a repository without models."""
        from service.diffusion.checkpoint import is_model_folder

        if not self.models:
            return [Path(self.model)]
        paths = [Path(p.strip()) for p in self.models.split(",") if p.strip()]
        if not paths:
            raise ValueError("DDPM_MODELS names no model folder")
        if len(paths) == 1 and paths[0].is_dir() and not is_model_folder(paths[0]):
            repository = paths[0]
            paths = sorted(p for p in repository.iterdir() if p.is_dir() and is_model_folder(p))
            if not paths:
                raise ValueError(f"DDPM_MODELS: {repository} is neither a model folder nor a folder of models")
        return paths

    def examples_dir_for(self, model_path: Path, default: bool) -> Path:
        """Example PNGs of one served model: ``examples_dir`` for the default model when set, else <model>/examples."""
        if default and self.examples_dir:
            return Path(self.examples_dir)
        return model_path / "examples"
