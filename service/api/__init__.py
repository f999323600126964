"""The HTTP layer: FastAPI app (``create_app``), routes, schemas and encoding; it reaches the engine only
through ``service.engine.client.EngineClient``."""

from service.api.app import create_app

__all__ = ["create_app"]
