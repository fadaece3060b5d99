"""The HTTP side: the backend's views (:mod:`.app`) on label-studio-ml's Flask app, patched (:mod:`.ls_ml`)."""

from isal_backend.server.app import create_app

__all__ = ["create_app"]
