"""Storage key names of every kind's round artifacts, in one place.

A round is stored as tensors (``state.pt``) and JSON metadata (``meta.json``) by
:class:`isal_backend.store.ModelStore`; each task kind turns its typed model into these and back
(:meth:`isal_backend.tasks.base.Task.save` / ``load``) with the names below, so no module spells a key
of its own and a stored round of one kind is never read as another.
"""

# -- metadata (meta.json) -------------------------------------------------------------------------------
KIND = "kind"  # the task kind that wrote the round
LABELS = "labels"  # the label config's labels, in order: a round for other labels is not reused
STRATEGY = "strategy"  # the strategy the round ordered by (new tasks are placed by its keys)
TOP_K = "top_k"  # classification: classes in ISAL's expected gradient
BACKBONE = "backbone"  # classification: the feature extractor and its input size
IMAGE_SIZE = "image_size"
BACKBONE_VERSION = "backbone_version"  # classification finetune: the fine-tuned backbone's name
PROJECTION = "projection"  # classification: how the projection was fitted (rows, variance kept)
DETECTOR = "detector"  # detection: the detector's architecture (DetectorConfig as a dict)
INFLUENCE_PARAMS = "influence_params"  # detection: the final convs s_test is laid out over
SCORE_THRESHOLD = "score_threshold"  # detection: pseudo-label and pre-label box threshold

# -- tensors (state.pt) ---------------------------------------------------------------------------------
POOL_KEYS = "pool_keys_sorted"  # the round's pool values of its strategy's key, ascending
HEAD = "head_weight"  # classification: the pre-label head, C x (d + 1)
PROJECTION_MEAN = "projection_mean"
PROJECTION_BASIS = "projection_basis"
PROJECTION_SCALE = "projection_scale"
BACKBONE_PREFIX = "backbone."  # classification finetune: the backbone's state dict
DETECTOR_PREFIX = "detector."  # detection: the detector's state dict
S_TEST = "s_test"  # detection: s_test over INFLUENCE_PARAMS


def unit_head(i: int) -> str:
    """Classification: the head of influence unit ``i`` (one per cross-fitting fold)."""
    return f"unit{i}_head"


def unit_s_test(i: int) -> str:
    return f"unit{i}_s_test"


def unit_scale(i: int) -> str:
    return f"unit{i}_scale"


def prefixed(tensors: dict, prefix: str) -> dict:
    """The entries under ``prefix``, with it stripped (a state dict stored inside the round's tensors)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
