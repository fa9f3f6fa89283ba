"""WSGI entry point for gunicorn: `gunicorn service.wsgi:app` (REDIS_URL, CONVQ_* from env)."""

from .app import create_app

app = create_app()
