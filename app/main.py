"""`uvicorn app.main:app`: the API built from QF_* settings (used for multi-worker serving)."""

from app.api import create_app
from quarkflow_core.config import get_settings

settings = get_settings()
app = create_app(settings, host=None)
