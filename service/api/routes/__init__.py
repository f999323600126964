"""Thin route modules: generate, noise, denoise (one step), health (liveness, readiness, model, metrics)."""
