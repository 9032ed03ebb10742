"""A bare aiohttp "return 200" server: the ceiling for any aiohttp handler on this machine.

Same shape as `gateway serve`: N forked workers each binding the port with SO_REUSEPORT, uvloop,
no access log. The handler returns a small fixed body and ignores the request headers.
`POST /api/webhooks/label-studio` (scenario 7) reads the whole request body and answers the
gateway's webhook answer for one new annotation, the same JSON bytes, without parsing or recording.

    python -m bench.bare --port 8099 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import signal

from aiohttp import web

BODY = b"ok\n"
WEBHOOK_PATH = "/api/webhooks/label-studio"
# What the gateway answers one ANNOTATION_CREATED of a new annotation (aiohttp's json_response).
WEBHOOK_ANSWER = b'{"status": "recorded", "action": "ANNOTATION_CREATED", "count": 1, "versions": [1]}'


async def handle(_request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="text/plain")


async def handle_webhook(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=WEBHOOK_ANSWER, content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", handle)
    app.router.add_post(WEBHOOK_PATH, handle_webhook)
    return app


def serve(host: str, port: int, reuse_port: bool) -> None:
    loop = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(
        make_app(),
        host=host,
        port=port,
        reuse_port=reuse_port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
        loop=loop,
    )


def _worker(host: str, port: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # die with the supervisor
    serve(host, port, reuse_port=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.bare", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.workers <= 1:
        serve(args.host, args.port, reuse_port=False)
        return 0
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker, args=(args.host, args.port)) for _ in range(args.workers)]
    for process in workers:
        process.start()

    def stop(_signum: int, _frame: object) -> None:
        for process in workers:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for process in workers:
        process.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
