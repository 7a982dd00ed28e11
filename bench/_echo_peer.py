"""The peer of ``bench/overload.py --peer``: a bare FastAPI app on uvicorn that answers the same
v2 request as the cloud service, with no model, no batcher and no limits.

What *its* RSS keeps after the same flood is what CPython, uvicorn and FastAPI keep after serving
256 connections at once, whatever the app: the floor the service's own figure is read against.
``POST /release`` does what the service does once idle after load (glibc's ``malloc_trim``), so
both are measured after the same release.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@app.post("/v2/models/{model}/infer")
async def infer(model: str, request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    pixels = body["inputs"][0]["data"]
    await asyncio.sleep(0.005)  # requests overlap as they do in the service's queue
    score = sum(pixels) / (255.0 * max(1, len(pixels)))
    return JSONResponse({"model_name": model, "outputs": [
        {"name": "probabilities", "shape": [1, 10], "datatype": "FP32", "data": [score] * 10}]})


@app.get("/v2/health/ready")
async def ready() -> dict:
    return {}


@app.post("/release")
async def release() -> dict:
    return {"trimmed": bool(_LIBC.malloc_trim(0))}
