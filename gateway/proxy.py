"""The media routes on aiohttp: `/tasks/{id}/resolve/` and `/projects/{id}/resolve/`.

Only framing lives here. What to answer is `MediaService.prepare`'s (gateway/media/): the same
decisions, needs and downloads as the fast lane's (gateway/fastlane.py), which frames media GETs
and HEADs on `gateway serve`; aiohttp answers the media requests the fast lane hands over (HTTP/1.0,
a request with a body, `Expect`, one pipelined behind a request of aiohttp's), and every request in
servers without the fast lane (the test client).
"""

from __future__ import annotations

import logging

from aiohttp import web

from . import metrics
from .cors import CorsPolicy
from .media.answers import Answer, head_fields
from .media.core import Facts, MediaRequest
from .media.service import MediaService, Opened
from .state import CLIENT, ERROR, MODE, REQUEST_ID, SUB, TASK
from .storage import StorageError

log = logging.getLogger("gateway.proxy")


class MediaHandler:
    def __init__(self, service: MediaService, cors: CorsPolicy) -> None:
        self._service = service
        self._cors = cors

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        match = request.match_info
        task_text = match.get("task_id")
        task_id = int(task_text) if task_text is not None else None
        if task_id is not None:
            request[TASK] = task_id
        media = MediaRequest(
            request.method,
            task_id,
            match.get("project_id"),
            request.query,
            request.headers,
            request.cookies,
            request.get(CLIENT),
        )
        facts = Facts()
        try:
            outcome = await self._service.prepare(media, facts)
            if facts.sub is not None:
                request[SUB] = facts.sub
            self._service.count(facts)
            if isinstance(outcome, Opened):
                return await self._stream(request, outcome)
            return await self._answer(request, outcome)
        finally:
            if facts.slot is not None:
                facts.slot.release()
            if facts.reader is not None:
                facts.reader.close()

    def _head(self, request: web.Request, status: int, headers: dict[str, str], length: int) -> web.StreamResponse:
        fields = head_fields(
            status, headers, length, request[REQUEST_ID], self._cors.fields(request.headers.get("Origin"))
        )
        return web.StreamResponse(status=status, headers=fields)

    async def _answer(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        request[MODE] = answer.mode
        if answer.error is not None:
            request[ERROR] = answer.error
        response = self._head(request, answer.status, answer.headers, answer.length)
        await response.prepare(request)
        if answer.body and request.method != "HEAD":
            await response.write(answer.body)
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request, opened: Opened) -> web.StreamResponse:
        """Write the reader's bytes with backpressure; a broken upstream aborts the client."""
        stream, reader = opened.stream, opened.reader
        request[MODE] = stream.mode
        response = self._head(request, stream.plan.status, stream.headers, stream.plan.length)
        metrics.BATCH.inc(metrics.ACTIVE_STREAMS)
        try:
            await response.prepare(request)
            async for chunk in reader.chunks():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:  # the client went away (reset, or lost while paused for it)
            request[ERROR] = "client_disconnected"
        except StorageError as exc:
            # Headers are out: the only honest signal left is to close the connection before
            # Content-Length bytes (after flushing what was sent).
            request[ERROR] = exc.reason
            log.warning("upstream failed mid-body (%s): aborting the client connection", exc.reason)
            response.force_close()
            if request.transport is not None:
                request.transport.close()
        finally:
            metrics.BATCH.inc(metrics.ACTIVE_STREAMS, -1)
            reader.close()
        return response
