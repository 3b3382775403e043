"""A bare FastAPI endpoint: one multipart field ``file``, decoded and run inline (no batching,
no logging, no auth). ``python server_bare.py PORT``."""

from __future__ import annotations

import sys

import common
import uvicorn
from fastapi import FastAPI, File, UploadFile

app = FastAPI()
SESSION = common.session()


@app.post("/predict")
def predict(file: UploadFile = File(...)) -> dict:
    return common.predict(SESSION, common.decode(file.file.read())[None])[0]


@app.get("/health")
def health() -> dict:
    return {"ok": True}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
