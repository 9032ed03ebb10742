"""The I/O half of the media path, shared by both lanes: fill what the core needs, open downloads.

`prepare` asks `MediaCore.decide` until it has an outcome, filling each need on the way (verify a
token, look a task up, ask Label Studio, read metadata, sign a URL), and for a stream takes the
stream slot and opens the download. The aiohttp handler and the fast lane both call it; neither
decides anything itself.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass

from .. import metrics
from ..errors import Refused
from ..httpsem import ByteRange, Plan
from ..netguard import StreamLimiter
from ..registry import RegistryUnavailable
from ..signer import SigningError, sign_url
from ..storage import ObjectReader, StorageError, storage_endpoint
from ..storage.base import ObjectNotFound, RangeNotSatisfiable
from .answers import Answer, error_answer, refusal_answer, registry_answer, storage_error_answer
from .core import (
    Facts,
    MediaCore,
    MediaRequest,
    NeedClaims,
    NeedEntry,
    NeedGrant,
    NeedSignature,
    NeedTask,
    Outcome,
    Stream,
)

log = logging.getLogger("gateway.proxy")
_ROUNDS = 8  # needs one request can have: claims, task, metadata, signature, and a changed object twice


@dataclass(frozen=True, slots=True)
class Opened:
    """A stream outcome with its download open (and its stream slot held in the request's facts)."""

    stream: Stream
    reader: ObjectReader


def delivers(plan: Plan, reader: ObjectReader) -> bool:
    """Whether an open download carries exactly the span the plan promises to the client."""
    return (plan.status == 206) == reader.partial and (plan.first, plan.last) == (reader.first, reader.last)


class MediaService:
    def __init__(self, core: MediaCore, limiter: StreamLimiter) -> None:
        self.core = core  # its caches and sources: what the needs are filled from
        self.limiter = limiter
        self._signed_endpoint = storage_endpoint(dict(os.environ))

    async def prepare(self, request: MediaRequest, facts: Facts, outcome: Outcome | None = None) -> Answer | Opened:
        """The final answer to a media request, or its stream with the download open. Never
        raises for what a request or its storage can cause; the caller releases `facts.slot`."""
        core = self.core
        for _ in range(_ROUNDS):
            if outcome is None:
                outcome = core.decide(request, facts)
            if isinstance(outcome, Answer):
                return outcome
            try:
                if isinstance(outcome, Stream):
                    opened = await self._open(outcome, facts)
                    if opened is not None:
                        return opened
                    facts.entry = None  # the object changed or went away: decide again on fresh metadata
                else:
                    await self._fill(outcome, facts)
            except Refused as exc:
                return refusal_answer(exc, facts.sub)
            except StorageError as exc:
                return storage_error_answer(exc, facts.sub)
            except RegistryUnavailable:  # logged once per outage by the registry
                return registry_answer()
            outcome = None
        return error_answer(503, "object_changing", "the object changed while it was being read; retry", sub=facts.sub)

    def count(self, facts: Facts) -> None:
        """The cache metrics of an answered request (once, by the lane that answered)."""
        batch = metrics.BATCH
        if facts.metadata_hit is not None:
            batch.inc(metrics.METADATA_HIT if facts.metadata_hit else metrics.METADATA_MISS)
        if facts.signed_hit is not None:
            batch.inc(metrics.SIGNED_CACHE_HIT if facts.signed_hit else metrics.SIGNED_CACHE_MISS)

    async def _fill(self, need: object, facts: Facts) -> None:
        if isinstance(need, NeedClaims):
            facts.claims = await self.core.verifier.verify(need.token)
        elif isinstance(need, NeedTask):
            facts.task = await self.core.tasks.get(need.task_id)
        elif isinstance(need, NeedEntry):
            await self._learn(need, facts)
        elif isinstance(need, NeedSignature):
            facts.signed, facts.signed_hit = await self._sign(need)
        elif isinstance(need, NeedGrant):
            assert self.core.label_studio is not None
            try:
                facts.grant = await self.core.label_studio.decide(need.credential, need.kind, need.ident)
            except Refused as exc:
                facts.grant = exc
        else:  # pragma: no cover - every Need is handled above
            raise TypeError(need)

    async def _learn(self, need: NeedEntry, facts: Facts) -> None:
        """The object's metadata: from an opened download when the request is a cold GET (one
        upstream request yields metadata and bytes) and a stream slot is free, else from stat."""
        facts.metadata_hit = False
        storage, backend, uri = need.storage, need.backend, need.uri
        if need.open_range is not False and (facts.slot is not None or self.limiter.admits(facts.sub or "")):
            if facts.slot is None:  # a request decided again (its object changed) keeps the slot it has
                facts.slot = self.limiter.slot(facts.sub or "")
            try:
                reader = await backend.open(uri.key, need.open_range)  # type: ignore[arg-type]
            except RangeNotSatisfiable:
                reader = None  # the size is needed for Content-Range: ask for metadata
            if reader is not None:
                facts.reader = reader
                facts.entry = self.core.remember(storage, uri, reader.meta)
                return
        facts.entry = self.core.remember(storage, uri, await backend.stat(uri.key))

    async def _open(self, stream: Stream, facts: Facts) -> Opened | None:
        """The download of a stream outcome, in its stream slot; None when the object changed or
        went away since its metadata was cached (the entry is then refreshed or dropped)."""
        if facts.slot is None:
            facts.slot = self.limiter.slot(stream.sub)  # at a cap: Refused, a 503 / 429
        plan, reader = stream.plan, facts.reader
        facts.reader = None
        if reader is None:
            try:
                reader = await stream.backend.open(
                    stream.uri.key, ByteRange(plan.first, plan.last) if plan.status == 206 else None
                )
            except (RangeNotSatisfiable, ObjectNotFound):
                self.core.forget(stream.storage, stream.uri)  # shrank or went away: ask again (a 404 now is real)
                return None
        if reader.meta.etag == stream.entry.meta.etag and delivers(plan, reader):
            return Opened(stream, reader)
        reader.close()
        if reader.meta.etag != stream.entry.meta.etag:
            self.core.remember(stream.storage, stream.uri, reader.meta)
        return None

    async def _sign(self, need: NeedSignature) -> tuple[tuple[str, float], bool]:
        """A V4 signed URL from the shared cache, signed (once for concurrent misses) when absent."""
        signer = self.core.catalog.signers[need.storage.id]
        uri = need.uri

        async def sign(now: float) -> str:
            started = time.perf_counter()
            try:
                url = await sign_url(
                    signer,
                    endpoint=self._signed_endpoint,
                    bucket=uri.bucket,
                    key=uri.key,
                    ttl_seconds=need.ttl,
                    now=datetime.datetime.fromtimestamp(now, datetime.UTC),
                    query=need.overrides,
                )
            except SigningError as exc:
                metrics.SIGNING_FAILURES.labels(exc.reason).inc()
                raise Refused(503, f"signing_{exc.reason}", str(exc)) from None
            metrics.SIGNING_SECONDS.labels(signer.method).observe(time.perf_counter() - started)
            metrics.SIGNED_URLS.labels(signer.method).inc()
            return url

        url, expires_at, hit = await self.core.signed.get(need.key, need.ttl, sign)
        return (url, expires_at), hit
