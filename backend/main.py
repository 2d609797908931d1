"""The app `uvicorn backend.main:app` and `python -m backend serve` run (built by backend.api.app)."""
from backend.api.app import create_app

app = create_app()
