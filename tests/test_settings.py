"""Settings.from_env: defaults, parsing, and an error naming variable, value (never a secret) and fix."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from isal_backend.settings import (
    KNOWN_BACKBONES,
    KNOWN_DETECTION_PARAMS,
    KNOWN_STRATEGIES,
    Settings,
    SettingsError,
    project_credentials,
    save_project_credentials,
)


def test_defaults():
    s = Settings.from_env({})
    assert (s.label_studio_url, s.label_studio_api_key, s.redis_url) == (None, None, None)
    assert s.embedded and not s.basic_auth_enabled
    assert s.model_dir == Path("./models") and s.write_top_m == 1000 and s.backbone == "efficientnet-lite0"
    assert (s.top_k, s.holdout_fraction, s.strategy, s.train_mode, s.device) == (None, 0.2, "isal", "head", "cpu")
    assert (s.log_level, s.rq_queue) == ("INFO", "isal")
    assert s.round_job == "isal_backend.jobs.entry.run_round"
    assert s.score_job == "isal_backend.jobs.entry.score_new_tasks"
    assert (s.image_size, s.feature_dim, s.weight_decay, s.detection_first_steps) == (None, 128, 1e-2, 150)
    # the isal variant the README measures as the default (bench al, 10 seeds), in both places defaults live
    assert (s.isal_shortlist, s.isal_dedupe, s.isal_skip_aware, s.cold_start) == (2.0, 0.95, True, "typical")
    assert (Settings().isal_shortlist, Settings().isal_dedupe, Settings().isal_skip_aware) == (2.0, 0.95, True)


def test_every_variable_is_read():
    s = Settings.from_env({
        "LABEL_STUDIO_URL": "https://ls.example.com/", "LABEL_STUDIO_API_KEY": "k", "REDIS_URL": "redis://r:6379/2",
        "MODEL_DIR": "/data/m", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p", "ISAL_WRITE_TOP_M": "0",
        "ISAL_BACKBONE": "resnet18", "ISAL_TOP_K": "3", "ISAL_HOLDOUT_FRACTION": "0", "ISAL_STRATEGY": "margin",
        "ISAL_TRAIN_MODE": "finetune", "ISAL_DEVICE": "cuda:1", "LOG_LEVEL": "debug", "RQ_QUEUE": "q1",
        "ISAL_LEASE_SECONDS": "2.5", "ISAL_JOB_RETRIES": "0", "ISAL_RETRY_BACKOFF": "1,2",
    })
    assert s.label_studio_url == "https://ls.example.com" and s.redis_url == "redis://r:6379/2" and not s.embedded
    assert s.model_dir == Path("/data/m") and s.basic_auth_enabled and s.write_top_m == 0
    assert (s.backbone, s.top_k, s.holdout_fraction, s.strategy) == ("resnet18", 3, 0.0, "margin")
    assert (s.train_mode, s.device, s.log_level, s.rq_queue) == ("finetune", "cuda:1", "DEBUG", "q1")
    assert (s.lease_seconds, s.job_retries, s.retry_backoff) == (2.5, 0, (1, 2))


@pytest.mark.parametrize(
    ("name", "value", "fix"),
    [
        ("LABEL_STUDIO_URL", "localhost:8080", "http://"),
        ("REDIS_URL", "127.0.0.1:6379", "redis://"),
        ("ISAL_WRITE_TOP_M", "-1", "0 writes every task"),
        ("ISAL_WRITE_TOP_M", "many", "e.g. 1000"),
        ("ISAL_BACKBONE", "vgg", "efficientnet-lite0"),
        ("ISAL_TOP_K", "0", ">= 1"),
        ("ISAL_HOLDOUT_FRACTION", "1.5", "[0, 1)"),
        ("ISAL_HOLDOUT_FRACTION", "abc", "[0, 1)"),
        ("ISAL_STRATEGY", "best", "isal"),
        ("ISAL_TRAIN_MODE", "full", "head, finetune"),
        ("ISAL_DEVICE", "gpu", "cuda"),
        ("LOG_LEVEL", "LOUD", "DEBUG"),
        ("RQ_QUEUE", "a queue", "letters"),
        ("ISAL_ROUND_JOB", "run_round", "dotted path"),
        ("ISAL_LEASE_SECONDS", "0", "positive"),
        ("ISAL_RETRY_BACKOFF", "1,x", "comma-separated"),
        ("ISAL_MAX_BODY_MB", "0", ">= 1"),
        ("ISAL_RECONCILE_SECONDS", "-1", ">= 0"),
        ("ISAL_RECONCILE_SECONDS", "inf", ">= 0"),
        ("ISAL_RECONCILE_SECONDS", "x", "a number of seconds"),
        ("ISAL_SHORTLIST", "-2", "a multiple of the batch >= 0"),
        ("ISAL_PACE_SETTLE_SECONDS", "-0.1", "a number of seconds >= 0"),
        ("ISAL_PACE_MAX_WAIT_SECONDS", "soon", "a number of seconds >= 0"),
    ],
)
def test_bad_values_name_variable_value_and_fix(name, value, fix):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: value})
    message = str(err.value)
    assert name in message and repr(value) in message and fix in message


@pytest.mark.parametrize(("given", "value"),
                         [("LABEL_STUDIO_URL", "http://ls:8080"), ("LABEL_STUDIO_API_KEY", "key-789")])
def test_label_studio_url_and_key_are_set_together(given, value):
    """A key without its URL would go to whatever host /setup names (issue 10, item 1)."""
    with pytest.raises(SettingsError) as err:
        Settings.from_env({given: value})
    message = str(err.value)
    assert "LABEL_STUDIO_URL" in message and "LABEL_STUDIO_API_KEY" in message and "both" in message
    assert "key-789" not in message
    with pytest.raises(SettingsError):
        Settings(**({"label_studio_url": value} if given == "LABEL_STUDIO_URL" else {"label_studio_api_key": value}))


def test_the_environment_key_never_pairs_with_a_stored_host(tmp_path):
    """With both variables set the stored file is ignored; without them, the stored pair is used whole."""
    plain = Settings.from_env({"MODEL_DIR": str(tmp_path)})
    save_project_credentials(plain, 6, "http://stored-host:8080", "stored-token")
    env = Settings.from_env({"MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL": "http://env-host",
                             "LABEL_STUDIO_API_KEY": "env-key"})
    assert (project_credentials(env, 6).url, project_credentials(env, 6).api_key) == ("http://env-host", "env-key")
    assert (project_credentials(plain, 6).url, project_credentials(plain, 6).api_key) == (
        "http://stored-host:8080", "stored-token")


def test_body_limit_and_reconciliation_period_are_read():
    s = Settings.from_env({"ISAL_MAX_BODY_MB": "5", "ISAL_RECONCILE_SECONDS": "0"})
    assert (s.max_body_mb, s.reconcile_seconds) == (5, 0.0)
    assert (Settings.from_env({}).max_body_mb, Settings.from_env({}).reconcile_seconds) == (100, 60.0)


def test_pacing_is_read_and_can_be_turned_off():
    s = Settings.from_env({"ISAL_PACE_SETTLE_SECONDS": "0", "ISAL_PACE_MAX_WAIT_SECONDS": "4"})
    assert (s.pace_settle_seconds, s.pace_max_wait_seconds) == (0.0, 4.0)
    assert (Settings.from_env({}).pace_settle_seconds, Settings.from_env({}).pace_max_wait_seconds) == (0.3, 1.5)


def test_settings_error_is_a_value_error_for_the_cli():
    assert issubclass(SettingsError, ValueError)


def test_secrets_never_in_errors_or_repr():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"BASIC_AUTH_PASS": "hunter2\nx", "BASIC_AUTH_USER": "u"})
    assert "hunter2" not in str(err.value) and "BASIC_AUTH_PASS" in str(err.value)
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"REDIS_URL": "http://:redispw@host:6379"})
    assert "redispw" not in str(err.value)
    s = Settings.from_env({"LABEL_STUDIO_URL": "http://ls:8080", "LABEL_STUDIO_API_KEY": "key-123",
                           "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "pw-456",
                           "REDIS_URL": "redis://:redispw@host:6379/0"})
    for text in (repr(s), str(s), f"{s}"):
        assert "key-123" not in text and "pw-456" not in text and "redispw" not in text and "***" in text


@pytest.mark.parametrize("given", ["BASIC_AUTH_USER", "BASIC_AUTH_PASS"])
def test_basic_auth_needs_both_or_neither(given):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({given: "x"})
    assert "BASIC_AUTH_USER" in str(err.value) and "BASIC_AUTH_PASS" in str(err.value) and "both" in str(err.value)


def test_known_lists_match_the_engine():
    from isal_backend.detection.detector import FINAL_CONVS
    from isal_backend.models.backbones import BACKBONES
    from isal_backend.strategies.catalog import make_strategy

    assert set(KNOWN_BACKBONES) == set(BACKBONES)
    assert all(make_strategy(name).name == name for name in KNOWN_STRATEGIES)  # one list of names, all built
    assert tuple(FINAL_CONVS) == KNOWN_DETECTION_PARAMS


def test_recipe_settings_are_read_and_checked():
    s = Settings.from_env({"ISAL_IMAGE_SIZE": "64", "ISAL_FEATURE_DIM": "0", "ISAL_WEIGHT_DECAY": "0.001",
                           "ISAL_DETECTION_FIRST_STEPS": "7"})
    assert (s.image_size, s.feature_dim, s.weight_decay, s.detection_first_steps) == (64, 0, 1e-3, 7)
    for name, bad in (("ISAL_IMAGE_SIZE", "8"), ("ISAL_FEATURE_DIM", "-1"), ("ISAL_WEIGHT_DECAY", "0"),
                      ("ISAL_WEIGHT_DECAY", "lots")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: bad})


def test_project_credentials_env_first_then_setup_file(tmp_path):
    s = Settings.from_env({"MODEL_DIR": str(tmp_path)})
    with pytest.raises(SettingsError, match="LABEL_STUDIO_URL"):
        project_credentials(s, 5)
    path = save_project_credentials(s, 5, "http://ls:8080/", "tok-5")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = project_credentials(s, 5)
    assert (creds.url, creds.api_key) == ("http://ls:8080", "tok-5") and "tok-5" not in repr(creds)
    env = {"MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL": "http://other", "LABEL_STUDIO_API_KEY": "k"}
    s2 = Settings.from_env(env)
    assert project_credentials(s2, 5).api_key == "k" and project_credentials(s2, 5).url == "http://other"


def test_embedded_threads_setting() -> None:
    assert Settings.from_env({}).embedded_threads == 2
    assert Settings.from_env({"ISAL_EMBEDDED_THREADS": "3"}).embedded_threads == 3
    with pytest.raises(SettingsError, match="ISAL_EMBEDDED_THREADS"):
        Settings.from_env({"ISAL_EMBEDDED_THREADS": "0"})
