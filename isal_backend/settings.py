"""The backend's configuration, read once from the environment and validated up front.

Every bad value raises :class:`SettingsError` naming the variable, the value (never for secrets) and the
fix, so a misconfigured deployment fails at start instead of on the first webhook. Secrets
(``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_PASS``, the password in ``REDIS_URL``, tokens persisted from
``/setup``) never appear in ``repr`` or logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from isal_backend.strategies import COLD_STARTS
from isal_backend.strategies import STRATEGIES as KNOWN_STRATEGIES

# Kept in sync with isal_backend.models.backbones.BACKBONES (tests/test_settings.py checks it); copied so
# that reading settings never imports torch.
KNOWN_BACKBONES = ("small-cnn", "resnet18", "resnet18-cifar", "efficientnet-lite0")
TRAIN_MODES = ("head", "finetune")
# FCOS's final prediction convs (isal_backend.detection.detector.FINAL_CONVS; the same test checks it).
KNOWN_DETECTION_PARAMS = ("cls_logits", "bbox_reg", "bbox_ctrness")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
SECRET_FIELDS = frozenset({"label_studio_api_key", "basic_auth_pass"})
MASK = "***"


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message says which variable and how to fix it."""


def mask_url_password(url: str | None) -> str | None:
    """``redis://:pw@host/0`` -> ``redis://:***@host/0`` so URLs can be logged."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class Settings:
    """Validated configuration; build it with :meth:`from_env`."""

    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    redis_url: str | None = None
    model_dir: Path = Path("./models")
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    write_top_m: int = 1000
    #: The fewest predictions a round writes, whatever the annotation rate (the adaptive size's floor).
    write_min: int = 20
    backbone: str = "efficientnet-lite0"
    #: Input size of the classification backbone; None = its native size (128 px for EfficientNet-Lite0).
    image_size: int | None = None
    #: Principal components the backbone features are projected onto before the head; 0 keeps them raw.
    feature_dim: int = 128
    #: L2 weight decay of the classification head (on the projected, unit-variance features).
    weight_decay: float = 1e-2
    #: None = auto: 2, or 1 for two classes (what `bench al` measured best).
    top_k: int | None = None
    holdout_fraction: float = 0.2
    strategy: str = "isal"
    #: The order until a model can be had (no labels, one class): typical-first, core-set or random.
    cold_start: str = "typical"
    #: Rounds with fewer labels than this keep the cold-start order although a model can be had (0: none).
    warmup_labels: int = 0
    #: ISAL (classification): influence orders only the N x batch smallest-margin tasks (0: the whole pool).
    #: The three defaults below are the variant measured level with margin on clean pools and ahead of it
    #: where annotators skip junk (README, Measured); 0 / 0 / False is the plain influence order.
    isal_shortlist: float = 2.0
    #: ISAL: a task this similar (cosine) to one already in the batch waits (0: off).
    isal_dedupe: float = 0.95
    #: ISAL: tasks that look like the ones annotators skipped go after the others.
    isal_skip_aware: bool = True
    train_mode: str = "head"
    device: str = "cpu"
    log_level: str = "INFO"
    rq_queue: str = "isal"
    # Queue plumbing (not in the README's user-facing list; tests and operators may override them).
    redis_prefix: str = "isal"
    round_job: str = "isal_backend.jobs.entry.run_round"
    score_job: str = "isal_backend.jobs.entry.score_new_tasks"
    lease_seconds: float = 30.0
    job_retries: int = 3
    embedded_threads: int = 2
    #: Niceness added to the threads that run rounds (0-19): Label Studio on the same host answers first.
    worker_nice: int = 10
    retry_backoff: tuple[int, ...] = (10, 60, 300)
    shard_size: int = 2000
    #: New images a round featurizes before it orders (0: all); the rest follow in the next rounds.
    round_new_images: int = 4000
    finetune_epochs: int = 3
    delete_old_predictions: bool = True
    #: A round reads only what changed since the last (the task mirror); a full resync at least this often.
    full_resync_seconds: float = 3600.0
    shard_lease_seconds: float = 300.0
    # Object detection projects (<RectangleLabels>); see isal_backend/tasks/detection.py.
    detection_score_threshold: float = 0.5
    detection_steps: int = 60
    detection_first_steps: int = 150
    detection_image_size: int = 320
    detection_params: tuple[str, ...] = KNOWN_DETECTION_PARAMS
    detection_cache_mb: int = 2048
    #: Largest request body the server reads (413 above it): a huge body costs several times its size in memory.
    max_body_mb: int = 100
    #: How often workers compare each project's newest annotation with its last round (0: never).
    reconcile_seconds: float = 60.0
    #: A round's calls to Label Studio wait this long after an annotator's event (0: no pacing); see pacing.py.
    pace_settle_seconds: float = 0.3
    #: The longest a paced step waits for a quiet moment.
    pace_max_wait_seconds: float = 1.5

    def __post_init__(self) -> None:
        if (self.label_studio_url is None) != (self.label_studio_api_key is None):
            given, missing = ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY") if self.label_studio_api_key is None else (
                "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_URL")
            # A key without its URL would go to whatever host a /setup call names; a URL without its key would
            # pair with a token that /setup received from elsewhere.
            raise SettingsError(
                f"{given} is set but {missing} is not: set both LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (the key "
                "is then only ever sent to that URL), or neither (each project then uses the host and token that "
                "Label Studio's /setup call sends, stored once Label Studio accepts them)"
            )
    # Task image downloads (see isal_backend/labelstudio/fetch.py and failures.py).
    ssrf_protection: bool = True
    image_hosts_allowed: tuple[str, ...] = ()
    download_deadline_seconds: float = 30.0
    #: Images a round downloads and decodes at once while it featurizes (the first round of an import).
    download_threads: int = 4
    failed_image_retry_seconds: int = 3600

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value is not None:
                value = MASK
            elif f.name == "redis_url":
                value = mask_url_password(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    @property
    def basic_auth_enabled(self) -> bool:
        return self.basic_auth_user is not None

    @property
    def embedded(self) -> bool:
        """No REDIS_URL: jobs run on a thread inside the server process."""
        return self.redis_url is None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise :class:`SettingsError` on the first bad one."""
        env = os.environ if env is None else env
        r = _Reader(env)
        user = r.optional_str("BASIC_AUTH_USER")
        password = r.optional_str("BASIC_AUTH_PASS", secret=True)
        if (user is None) != (password is None):
            missing = "BASIC_AUTH_PASS" if password is None else "BASIC_AUTH_USER"
            raise SettingsError(
                f"{missing} is not set but {'BASIC_AUTH_USER' if password is None else 'BASIC_AUTH_PASS'} is: "
                "set both BASIC_AUTH_USER and BASIC_AUTH_PASS to enable basic auth, or neither to disable it"
            )
        write_top_m = r.integer("ISAL_WRITE_TOP_M", 1000, minimum=0, hint="0 writes every task")
        write_min = r.integer("ISAL_WRITE_MIN", 20, minimum=1, hint="predictions a round writes at least")
        if write_top_m and write_min > write_top_m:
            raise SettingsError(f"ISAL_WRITE_MIN={write_min} is above ISAL_WRITE_TOP_M={write_top_m}: the floor of "
                                "the predictions a round writes cannot exceed their cap; lower ISAL_WRITE_MIN")
        ls_url = r.http_url("LABEL_STUDIO_URL")
        ls_key = r.optional_str("LABEL_STUDIO_API_KEY", secret=True)
        return cls(
            label_studio_url=ls_url,
            label_studio_api_key=ls_key,
            redis_url=r.redis_url("REDIS_URL"),
            model_dir=Path(r.optional_str("MODEL_DIR") or "./models"),
            basic_auth_user=user,
            basic_auth_pass=password,
            write_top_m=write_top_m,
            write_min=write_min,
            backbone=r.choice("ISAL_BACKBONE", "efficientnet-lite0", KNOWN_BACKBONES),
            image_size=r.optional_integer("ISAL_IMAGE_SIZE", minimum=16,
                                          hint="pixels; unset: the backbone's native size"),
            feature_dim=r.integer("ISAL_FEATURE_DIM", 128, minimum=0, hint="0 keeps the raw backbone features"),
            weight_decay=r.positive_float("ISAL_WEIGHT_DECAY", 1e-2, unit="a weight decay"),
            top_k=None if (r._raw("ISAL_TOP_K") or "auto").lower() == "auto"
            else r.integer("ISAL_TOP_K", 1, minimum=1, hint="or auto"),
            holdout_fraction=r.fraction("ISAL_HOLDOUT_FRACTION", 0.2),
            strategy=r.choice("ISAL_STRATEGY", "isal", KNOWN_STRATEGIES),
            cold_start=r.choice("ISAL_COLD_START", "typical", COLD_STARTS),
            warmup_labels=r.integer("ISAL_WARMUP_LABELS", 0, minimum=0,
                                    hint="labels before a model orders the stream; 0: as soon as one can be had"),
            isal_shortlist=r.non_negative("ISAL_SHORTLIST", 2.0, "a multiple of the batch"),
            isal_dedupe=r.fraction("ISAL_DEDUPE", 0.95),
            isal_skip_aware=r.choice("ISAL_SKIP_AWARE", "true", ("true", "false")) == "true",
            train_mode=r.choice("ISAL_TRAIN_MODE", "head", TRAIN_MODES),
            finetune_epochs=r.integer("ISAL_FINETUNE_EPOCHS", 3, minimum=1),
            device=r.device("ISAL_DEVICE", "cpu"),
            log_level=r.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
            rq_queue=r.name("RQ_QUEUE", "isal"),
            redis_prefix=r.name("ISAL_REDIS_PREFIX", "isal"),
            round_job=r.dotted("ISAL_ROUND_JOB", "isal_backend.jobs.entry.run_round"),
            score_job=r.dotted("ISAL_SCORE_JOB", "isal_backend.jobs.entry.score_new_tasks"),
            lease_seconds=r.positive_float("ISAL_LEASE_SECONDS", 30.0),
            job_retries=r.integer("ISAL_JOB_RETRIES", 3, minimum=0),
            embedded_threads=r.integer("ISAL_EMBEDDED_THREADS", 2, minimum=1),
            worker_nice=r.integer("ISAL_WORKER_NICE", 10, minimum=0, maximum=19,
                                  hint="0 keeps the default priority"),
            retry_backoff=r.int_list("ISAL_RETRY_BACKOFF", (10, 60, 300)),
            full_resync_seconds=r.seconds("ISAL_FULL_RESYNC_SECONDS", 3600.0),
            delete_old_predictions=r.choice("ISAL_DELETE_OLD_PREDICTIONS", "true", ("true", "false")) == "true",
            shard_size=r.integer("ISAL_SHARD_SIZE", 2000, minimum=1, hint="images per feature shard job"),
            round_new_images=r.integer("ISAL_ROUND_NEW_IMAGES", 4000, minimum=0,
                                       hint="new images a round featurizes before it orders; 0 = all"),
            shard_lease_seconds=r.positive_float("ISAL_SHARD_LEASE_SECONDS", 300.0),
            detection_score_threshold=r.fraction("ISAL_DETECTION_SCORE_THRESHOLD", 0.5),
            detection_steps=r.integer("ISAL_DETECTION_STEPS", 60, minimum=1,
                                      hint="detector training steps per round, batches of 4 images"),
            detection_first_steps=r.integer("ISAL_DETECTION_FIRST_STEPS", 150, minimum=1,
                                            hint="steps of a round with no stored detector to start from"),
            detection_image_size=r.integer("ISAL_DETECTION_IMAGE_SIZE", 320, minimum=64,
                                           hint="long side in pixels the detector sees"),
            detection_params=r.choice_list("ISAL_DETECTION_PARAMS", KNOWN_DETECTION_PARAMS),
            detection_cache_mb=r.integer("ISAL_DETECTION_CACHE_MB", 2048, minimum=0,
                                         hint="disk budget per project for the detector's body outputs; 0 keeps none"),
            max_body_mb=r.integer("ISAL_MAX_BODY_MB", 100, minimum=1, hint="megabytes per request body"),
            reconcile_seconds=r.seconds("ISAL_RECONCILE_SECONDS", 60.0),
            pace_settle_seconds=r.seconds("ISAL_PACE_SETTLE_SECONDS", 0.3),
            pace_max_wait_seconds=r.seconds("ISAL_PACE_MAX_WAIT_SECONDS", 1.5),
            ssrf_protection=r.choice("ISAL_SSRF_PROTECTION", "true", ("true", "false")) == "true",
            image_hosts_allowed=r.host_list("ISAL_IMAGE_HOSTS_ALLOWED"),
            download_deadline_seconds=r.positive_float("ISAL_DOWNLOAD_DEADLINE_SECONDS", 30.0),
            download_threads=r.integer("ISAL_DOWNLOAD_THREADS", 4, minimum=1, maximum=64,
                                       hint="images downloaded at once"),
            failed_image_retry_seconds=r.integer("ISAL_FAILED_IMAGE_RETRY_SECONDS", 3600, minimum=0,
                                                 hint="0 tries every failed image again every round"),
        )


def _as_float(value: str) -> float:
    """The number, or NaN (which fails every range check) when the text is not one."""
    try:
        return float(value)
    except ValueError:
        return float("nan")


class _Reader:
    """Per-type parsing with uniform error messages."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    @staticmethod
    def _fail(name: str, value: str, problem: str, fix: str, secret: bool = False) -> SettingsError:
        shown = "(value hidden)" if secret else repr(value)
        return SettingsError(f"{name}={shown} {problem}: {fix}")

    def optional_str(self, name: str, secret: bool = False) -> str | None:
        value = self._raw(name)
        if value is not None and any(c in value for c in "\r\n\0"):
            raise self._fail(name, value, "contains a line break or NUL", "remove it", secret)
        return value

    def http_url(self, name: str) -> str | None:
        value = self._raw(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise self._fail(name, value, "is not an http(s) URL", f"set it like {name}=http://localhost:8080")
        return value.rstrip("/")

    def redis_url(self, name: str) -> str | None:
        value = self._raw(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
            raise self._fail(
                name, mask_url_password(value) or "", "is not a Redis URL",
                f"set it like {name}=redis://127.0.0.1:6379/0, or unset it to run jobs in the server process",
            )
        return value

    def integer(self, name: str, default: int, minimum: int, hint: str = "", maximum: int | None = None) -> int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum or (maximum is not None and number > maximum):
            extra = f" ({hint})" if hint else ""
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise self._fail(name, value, f"is not an integer {bounds}", f"set it to e.g. {default}{extra}")
        return number

    def optional_integer(self, name: str, minimum: int, hint: str = "") -> int | None:
        return None if self._raw(name) is None else self.integer(name, minimum, minimum, hint)

    def positive_float(self, name: str, default: float, unit: str = "a positive number of seconds") -> float:
        value = self._raw(name)
        if value is None:
            return default
        number = _as_float(value)
        if not number > 0 or number == float("inf"):
            raise self._fail(name, value, f"is not {unit}", f"set it to e.g. {default:g}")
        return number

    def seconds(self, name: str, default: float) -> float:
        """A non-negative, finite number of seconds (0 turns the periodic thing off)."""
        return self.non_negative(name, default, "a number of seconds")

    def non_negative(self, name: str, default: float, what: str) -> float:
        """A non-negative, finite number, ``what`` naming it in the error (0 turns the thing off)."""
        value = self._raw(name)
        if value is None:
            return default
        number = _as_float(value)
        if not 0 <= number < float("inf"):
            raise self._fail(name, value, f"is not {what} >= 0", f"set it to e.g. {default:g} (0: off)")
        return number

    def fraction(self, name: str, default: float) -> float:
        value = self._raw(name)
        if value is None:
            return default
        number = _as_float(value)
        if not 0.0 <= number < 1.0:
            raise self._fail(name, value, "is not a fraction in [0, 1)", f"set it to e.g. {default}")
        return number

    def choice(self, name: str, default: str, choices: tuple[str, ...], upper: bool = False) -> str:
        value = self._raw(name)
        if value is None:
            return default
        normal = value.upper() if upper else value.lower()
        if normal not in choices:
            raise self._fail(name, value, "is not a known value", f"choose one of {', '.join(choices)}")
        return normal

    def choice_list(self, name: str, choices: tuple[str, ...]) -> tuple[str, ...]:
        """A comma-separated, non-empty subset of ``choices`` without repeats; unset means all of them."""
        value = self._raw(name)
        if value is None:
            return choices
        items = [v.strip().lower() for v in value.split(",")]
        if not items or any(v not in choices for v in items) or len(set(items)) != len(items):
            raise self._fail(name, value, "is not a comma-separated list of distinct known values",
                             f"choose from {','.join(choices)}")
        return tuple(items)

    def device(self, name: str, default: str) -> str:
        value = self._raw(name)
        if value is None:
            return default
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value.lower()):
            raise self._fail(name, value, "is not a torch device", "set it to cpu, cuda, cuda:N or mps")
        return value.lower()

    def name(self, name: str, default: str) -> str:
        value = self._raw(name)
        if value is None:
            return default
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", value):
            raise self._fail(name, value, "is not a plain name", "use 1-64 letters, digits, '_', '-' or '.'")
        return value

    def dotted(self, name: str, default: str) -> str:
        value = self._raw(name)
        if value is None:
            return default
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", value):
            raise self._fail(name, value, "is not a dotted path to a function", f"set it like {default}")
        return value

    def host_list(self, name: str) -> tuple[str, ...]:
        """Comma-separated host names (``*.domain`` for subdomains) and IP networks, in normal form."""
        value = self._raw(name)
        if value is None:
            return ()
        from isal_backend.labelstudio.fetch import parse_allowed_entry  # httpx only when the variable is set

        entries = []
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            try:
                entries.append(parse_allowed_entry(item))
            except ValueError as exc:
                fix = "list host names and networks, e.g. images.corp.example,*.corp.example,10.0.0.0/8"
                raise self._fail(name, value, f"has a bad entry: {exc}", fix) from None
        return tuple(dict.fromkeys(entries))

    def int_list(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        value = self._raw(name)
        if value is None:
            return default
        try:
            numbers = tuple(int(v) for v in value.split(","))
        except ValueError:
            numbers = ()
        if not numbers or any(n < 0 for n in numbers):
            raise self._fail(
                name, value, "is not a comma-separated list of seconds", f"set it like {','.join(map(str, default))}"
            )
        return numbers


# --------------------------------------------------------------------------------------------------
# Label Studio credentials: from the environment, else the ones /setup received (persisted 0600).


@dataclass(frozen=True)
class LabelStudioCredentials:
    """Where and how a job reaches Label Studio; ``api_key`` is masked in repr."""

    url: str
    api_key: str = field(repr=False)

    def __repr__(self) -> str:
        return f"LabelStudioCredentials(url={self.url!r}, api_key={MASK})"


def _credentials_path(settings: Settings, project_id: int) -> Path:
    return Path(settings.model_dir) / "projects" / str(int(project_id)) / "credentials.json"


def save_project_credentials(settings: Settings, project_id: int, hostname: str, access_token: str) -> Path:
    """Persist /setup's hostname and token for the project's jobs, readable by this user only (0600)."""
    path = _credentials_path(settings, project_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".credentials-")  # mkstemp creates it 0600
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"hostname": hostname, "access_token": access_token}, out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def stored_project_credentials(settings: Settings, project_id: int) -> LabelStudioCredentials | None:
    """What /setup stored for the project (verified with Label Studio before it was written), if anything."""
    try:
        stored = json.loads(_credentials_path(settings, project_id).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    url, key = stored.get("hostname"), stored.get("access_token")
    if not isinstance(url, str) or not url or not isinstance(key, str) or not key:
        return None
    return LabelStudioCredentials(url=url.rstrip("/"), api_key=key)


def project_credentials(settings: Settings, project_id: int) -> LabelStudioCredentials:
    """LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY when set, else what /setup stored for this project.

    Never a mix of the two: the environment's key only ever goes to the environment's URL.
    """
    if settings.label_studio_url is not None and settings.label_studio_api_key is not None:
        return LabelStudioCredentials(url=settings.label_studio_url.rstrip("/"), api_key=settings.label_studio_api_key)
    stored = stored_project_credentials(settings, project_id)
    if stored is None:
        raise SettingsError(
            f"project {project_id} has no Label Studio credentials: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are "
            "not set and no /setup call stored a host and token that Label Studio accepted; connect the backend to "
            "the project in Label Studio (Settings > Model), or set both variables"
        )
    return stored


def configure_logging(settings: Settings) -> None:
    """Root logging at LOG_LEVEL, once (an already configured root keeps its handlers), and on every handler,
    gunicorn's and RQ's included, the filter that redacts query values and userinfo of URLs in log lines."""
    from isal_backend.logs import install_redaction

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        root.setLevel(settings.log_level)
    install_redaction()
