"""Schemathesis (property-based fuzzing from /openapi.json) against the real server: ≥ 1000 requests over all
operations, no 5xx, every response conforming to the schema (status, content type, headers, body)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import Server

# positive_data_acceptance is left out: a schema-valid string is not a valid base64 .npy/PNG (x_t, image, noise)
# and t with ts together is valid JSON Schema but an ambiguous request; both rightly get 422.
CHECKS = ["--checks", "all", "--exclude-checks", "positive_data_acceptance"]


def http_requests(server: Server) -> dict[str, float]:
    """ddpm_http_requests_total summed by status class ("2", "4", "5")."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(server.client.get("/metrics").text):
        for s in family.samples:
            if s.name == "ddpm_http_requests_total":
                out[s.labels["status"][0]] = out.get(s.labels["status"][0], 0.0) + s.value
    return out


@pytest.mark.slow
def test_schemathesis(server_t50: Server, tmp_path: Path) -> None:
    before = http_requests(server_t50)
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{server_t50.url}/openapi.json", *CHECKS,
        "--max-examples", "45", "--seed", "1", "--workers", "2", "--no-color", "--generation-database", "none",
        "--suppress-health-check", "all", "--request-timeout", "60",
        "--report", "json", "--report-json-path", str(tmp_path / "report.json"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its caches go to tmp
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["operations"]["tested"] == report["operations"]["total"] >= 10
    assert report["failures"] == [] and report["errors"] == []
    after = http_requests(server_t50)
    sent = sum(after.values()) - sum(before.values())
    assert sent >= 1000, f"only {sent} requests"
    assert after.get("5", 0.0) == before.get("5", 0.0), "5xx responses"
    assert after.get("2", 0.0) - before.get("2", 0.0) > 100  # the fuzzer got through validation too
