"""WSGI entry point: ``gunicorn _wsgi:app`` (configuration from the environment, see isal_backend.settings).

Without REDIS_URL jobs run on a thread in this process: use ``--workers 1`` (any number of threads).
"""

from isal_backend.server import create_app

app = create_app()
