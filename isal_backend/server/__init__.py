"""The HTTP side: label-studio-ml's Flask app with its 1.0.9 defects fixed (see :mod:`.ls_ml_fixes`)."""

from isal_backend.server.ls_ml_fixes import IsalModel, create_app

__all__ = ["IsalModel", "create_app"]
