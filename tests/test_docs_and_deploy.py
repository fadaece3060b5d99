"""The README and docker/ describe what the code reads: every setting documented, compose wired up."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from isal_backend.bench.stack import LS_FAST_PREDICTION_IMPORT

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def settings_variables() -> set[str]:
    source = (REPO / "isal_backend" / "settings.py").read_text()
    return set(re.findall(r'r\.\w+\(\s*"([A-Z][A-Z0-9_]+)"', source))


def test_every_environment_variable_is_in_the_readme_table() -> None:
    variables = settings_variables()
    assert {"LABEL_STUDIO_URL", "REDIS_URL", "MODEL_DIR", "ISAL_WRITE_TOP_M"} <= variables
    table = [line for line in README.splitlines() if line.startswith("| `")]
    documented = {name for line in table for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])}
    internal = {"ISAL_ROUND_JOB", "ISAL_SCORE_JOB"}  # job entry points, for tests and operators
    assert variables - internal - documented == set()


def test_compose_file_runs_label_studio_on_postgres_redis_backend_and_worker() -> None:
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"label-studio", "postgres", "redis", "backend", "worker"}
    backend, worker = services["backend"], services["worker"]
    assert backend["environment"] == worker["environment"]  # one settings block (YAML anchor)
    assert backend["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert worker["command"] == ["python", "-m", "isal_backend", "worker"]
    assert backend["volumes"] == worker["volumes"]  # rounds written by workers are read by /predict
    assert set(backend["environment"]) <= settings_variables()
    ls_env = services["label-studio"]["environment"]
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false" and ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    # Label Studio's prediction import recounting only the tasks written to (bench loop measured it), the same
    # flag the benchmarks' --ls-env names.
    assert {k: str(v) for k, v in ls_env.items() if k in LS_FAST_PREDICTION_IMPORT} == LS_FAST_PREDICTION_IMPORT

    # Label Studio keeps its data in the postgres service's database, as its own compose file has it.
    postgres = services["postgres"]
    pg_env = postgres["environment"]
    assert postgres["image"].startswith("postgres:")
    assert ls_env["DJANGO_DB"] == "default" and ls_env["POSTGRE_HOST"] == "postgres"
    assert str(ls_env["POSTGRE_PORT"]) == "5432"
    assert (ls_env["POSTGRE_NAME"], ls_env["POSTGRE_USER"]) == (pg_env["POSTGRES_DB"], pg_env["POSTGRES_USER"])
    assert ls_env["POSTGRE_PASSWORD"] == pg_env["POSTGRES_PASSWORD"] and "${" in pg_env["POSTGRES_PASSWORD"]
    assert services["label-studio"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")
    assert volume[1] == "/var/lib/postgresql/data" and volume[0] in compose["volumes"]


def test_dockerfile_serves_the_wsgi_app_and_pins_torch() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "_wsgi:app" in dockerfile and "COPY _wsgi.py" in dockerfile
    pins = re.findall(r"^(torch(?:vision)?==[\d.]+)", (REPO / "requirements.txt").read_text(), re.M)
    assert pins and all(pin in dockerfile for pin in pins)
