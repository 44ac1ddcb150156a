"""The yardstick: a bare FastAPI endpoint that parses the same body with the same pydantic
model (`JobCreate`) and answers `202`, served exactly as `aigen api` serves its app.

`python -m bench.bare_app --port P` runs it through `aigen.runtime.EmbeddedServer` with the
`uvicorn.Config` options of `aigen.runtime.serve_api` (one process, the default asyncio
loop, the same HTTP implementation, no access log), so the only difference between the two
is what happens between parsing the body and answering.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from aigen.backend.job.schemas import JobCreate
from aigen.runtime import EmbeddedServer, install_stop_signals

app = FastAPI(title="bare")


@app.post("/v1/generate", status_code=202)
async def create(body: JobCreate) -> JSONResponse:
    """Parse and validate the body; answer 202 with a job-like id."""
    return JSONResponse(
        {"id": "job_" + secrets.token_hex(12), "status": "pending", "model": body.model},
        status_code=202,
    )


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve())
    await stop.wait()
    server.should_exit = True
    await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    asyncio.run(serve(options.host, options.port))


if __name__ == "__main__":
    main()
