"""The OpenAPI document, completed with the served model's limits and examples once it is loaded.

FastAPI builds the schema from the routes; limits that depend on the model (T, image shape) and on
the settings (images per request) are patched in here, so ``/docs`` and fuzzers see the real ranges:
``t ≤ T-1``, ``steps ≤ T``, ``num_images ≤ max``, and examples that the model accepts. Likewise the bearer
scheme (``service.api.auth``) stays only on the operations that enforce it with these settings: none without
API keys, ``/metrics`` only with ``DDPM_METRICS_AUTH=true``.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.api.schemas import GenerateResponse, NoiseResponse

__all__ = ["install_openapi"]

_EXTRA_MODELS: tuple[type[BaseModel], ...] = (GenerateResponse, NoiseResponse)


def _npy_b64(shape: tuple[int, ...]) -> str:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _set_int_max(prop: dict[str, Any], maximum: int) -> None:
    """Set ``maximum`` on an integer property, also inside ``anyOf: [integer, null]``."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option["maximum"] = maximum


def _patch(doc: dict[str, Any], big_t: int, shape: tuple[int, int, int], max_images: int) -> None:
    schemas = doc["components"]["schemas"]
    gen = schemas["GenerateRequest"]
    _set_int_max(gen["properties"]["num_images"], max_images)
    _set_int_max(gen["properties"]["steps"], big_t)
    steps = min(50, big_t)
    gen["examples"] = [
        {"num_images": min(4, max_images), "seed": 42, "sampler": "ddim", "steps": steps, "format": "png"},
        {"num_images": 1, "sampler": "ddpm", "steps": big_t, "format": "json"},
    ]
    den = schemas["DenoiseStepRequest"]
    _set_int_max(den["properties"]["t"], big_t - 1)
    den["examples"] = [
        {"x_t": _npy_b64(shape), "t": big_t - 1, "seed": 7},
        {"x_t": _npy_b64((1, *shape)), "t": 0, "variance": "fixed_large"},
    ]
    ts_example = sorted({0, big_t // 4, big_t // 2, 3 * big_t // 4, big_t - 1})
    for op in (doc["paths"]["/noise"]["get"], doc["paths"]["/noise"]["post"]):
        for param in op.get("parameters", []):
            if param["name"] == "t":
                _set_int_max(param["schema"], big_t - 1)
                param["example"] = min(300, big_t - 1)
            elif param["name"] == "ts":
                param["schema"]["items"]["maximum"] = big_t - 1
                param["example"] = ts_example


def _drop_unenforced_auth(doc: dict[str, Any], keys: bool, metrics_auth: bool) -> None:
    """Remove ``security`` and the 401 response from operations that, with these settings, need no key."""
    enforced = False
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            if not isinstance(op, dict) or "security" not in op:
                continue
            if keys and (path != "/metrics" or metrics_auth):
                enforced = True
                continue
            del op["security"]
            op.get("responses", {}).pop("401", None)
    if not enforced:
        doc.get("components", {}).pop("securitySchemes", None)


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with a generator that adds the models' limits once their engines are up."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in _EXTRA_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas.setdefault(model.__name__, schema)
        _drop_unenforced_auth(doc, bool(app.state.api_keys), app.state.settings.metrics_auth)
        engines = app.state.models.engines()
        if not engines or len(engines) < len(app.state.models):
            return doc  # models not loaded yet: generic limits, not cached
        infos = [engine.model_info for engine in engines]  # the default model first
        shape = (infos[0].channels, infos[0].image_size, infos[0].image_size)
        big_t = max(info.num_train_timesteps for info in infos)  # several models: the limits of the largest T
        _patch(doc, big_t, shape, app.state.max_images)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
