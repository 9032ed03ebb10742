"""The media download client (gateway/storage/http1.py) against scripted servers on loopback.

Each server is a real socket peer that reads request heads and writes exactly the bytes a test
needs (keep-alive, chunked coding, a cut body, a stall), which fake-gcs-server cannot be made to
do. The GCS backend's behaviour on top of this client is covered against fake-gcs-server in
test_backend_conformance.py and test_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.storage.http1 import BodyBroken, ConnectionFailed, MediaPool

Script = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.heads: list[bytes] = []
        self.release = asyncio.Event()  # set when the test ends: stalled handlers return

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head


@contextlib.asynccontextmanager
async def serving(script: Script) -> AsyncIterator[tuple[Server, str]]:
    server = Server()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            await script(server, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.release.set()
        listener.close()
        await listener.wait_closed()


def pool_for(origin: str, **overrides: object) -> MediaPool:
    options = {"limit": 8, "connect_timeout": 5.0, "idle_timeout": 5.0, "read_ahead": 64 * 1024, **overrides}
    return MediaPool(origin, **options)  # type: ignore[arg-type]


async def body_of(response) -> bytes:  # type: ignore[no-untyped-def]
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    return b"".join(parts)


def answer(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", "Content-Type: application/octet-stream", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def keep_alive_script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await server.head(reader)
        writer.write(answer(b"x" * 1000, "X-Goog-Generation: 7"))
        await writer.drain()


async def test_keep_alive_sends_every_request_on_one_connection():
    async with serving(keep_alive_script) as (server, origin):
        pool = pool_for(origin)
        for _ in range(3):
            response = await pool.get("/b/o/clip?alt=media", {"Range": "bytes=0-999", "Authorization": "Bearer t"})
            assert (response.status, response.headers["x-goog-generation"]) == (200, "7")
            assert await body_of(response) == b"x" * 1000
            response.release()
        pool.close()
    assert server.connections == 1
    head = server.heads[0].decode()
    assert head.startswith("GET /b/o/clip?alt=media HTTP/1.1\r\n")
    for line in (f"Host: {origin.removeprefix('http://')}", "User-Agent: media-gateway", "Range: bytes=0-999"):
        assert f"\r\n{line}\r\n" in head


async def test_a_body_left_unread_closes_its_connection():
    async with serving(keep_alive_script) as (server, origin):
        pool = pool_for(origin)
        first = await pool.get("/o", {})
        first.release()  # nothing read: the rest of the body would arrive on this socket
        second = await pool.get("/o", {})
        assert await body_of(second) == b"x" * 1000
        second.release()
        pool.close()
    assert server.connections == 2


async def test_chunked_transfer_coding_is_undone():
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await server.release.wait()

    async with serving(script) as (_server, origin):
        pool = pool_for(origin)
        response = await pool.get("/o", {})
        assert await body_of(response) == b"hello world"
        assert response.at_eof()
        response.release()
        pool.close()


async def test_an_interim_answer_is_skipped():
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.head(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"after the interim"))

    async with serving(script) as (server, origin):
        pool = pool_for(origin)
        for _ in range(2):  # and the connection stays in step for the next request
            response = await pool.get("/o", {})
            assert (response.status, await body_of(response)) == (200, b"after the interim")
            response.release()
        pool.close()
    assert server.connections == 1


async def test_a_body_without_length_ends_with_the_connection_and_is_not_pooled():
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")

    async with serving(script) as (server, origin):
        pool = pool_for(origin)
        response = await pool.get("/o", {})
        assert await body_of(response) == b"until the end"
        response.release()
        assert not pool._idle
        again = await pool.get("/o", {})
        assert await body_of(again) == b"until the end"
        again.release()
        pool.close()
    assert server.connections == 2


async def test_connection_close_answer_is_not_pooled():
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.head(reader)
        writer.write(answer(b"bye", "Connection: close"))
        await server.release.wait()

    async with serving(script) as (_server, origin):
        pool = pool_for(origin)
        response = await pool.get("/o", {})
        assert await body_of(response) == b"bye"
        response.release()
        assert not pool._idle
        pool.close()


async def test_a_pooled_connection_closed_while_idle_is_replaced_transparently():
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.head(reader)
        writer.write(answer(b"once"))  # keep-alive promised, then the server hangs up after one answer
        await writer.drain()

    async with serving(script) as (server, origin):
        pool = pool_for(origin)
        first = await pool.get("/o", {})
        assert await body_of(first) == b"once"
        first.release()
        assert len(pool._idle) == 1
        second = await pool.get("/o", {})  # may meet the closed socket first: resent on a new one
        assert await body_of(second) == b"once"
        second.release()
        pool.close()
    assert server.connections == 2


async def test_nothing_listening_is_connection_failed():
    async with serving(keep_alive_script) as (_server, origin):
        pass  # closed: the port is free again
    pool = pool_for(origin)
    with pytest.raises(ConnectionFailed):
        await pool.get("/o", {})
    pool.close()


async def test_hanging_up_before_the_head_is_connection_failed():
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.head(reader)

    async with serving(script) as (server, origin):
        pool = pool_for(origin)
        with pytest.raises(ConnectionFailed):
            await pool.get("/o", {})
        pool.close()
    assert server.connections == 1  # a fresh connection is not tried again here: the caller retries


async def test_a_body_cut_short_is_body_broken_and_not_pooled():
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 100)

    async with serving(script) as (_server, origin):
        pool = pool_for(origin)
        response = await pool.get("/o", {})
        with pytest.raises(BodyBroken):
            await body_of(response)
        response.release()
        assert not pool._idle
        pool.close()


async def test_a_malformed_answer_fails_the_request():
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\n")
        await server.release.wait()

    async with serving(script) as (_server, origin):
        pool = pool_for(origin)
        with pytest.raises(BodyBroken, match="malformed"):
            await pool.get("/o", {})
        pool.close()


async def test_a_stall_mid_body_times_out():
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 10)
        await server.release.wait()

    async with serving(script) as (_server, origin):
        pool = pool_for(origin, idle_timeout=0.2)
        response = await pool.get("/o", {})
        assert await response.read() == b"z" * 10
        with pytest.raises(TimeoutError):
            await response.read()
        response.release()
        pool.close()


async def test_read_ahead_pauses_reading_until_the_caller_catches_up():
    size = 8 * 1024 * 1024
    sent = asyncio.Event()

    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.head(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size // 65536):
            writer.write(b"r" * 65536)
            await writer.drain()
        sent.set()
        await server.release.wait()

    read_ahead = 64 * 1024
    async with serving(script) as (_server, origin):
        pool = pool_for(origin, read_ahead=read_ahead)
        response = await pool.get("/o", {})
        # Wait (bounded) until the client has buffered past its read-ahead: it must then stop reading,
        # so the server cannot finish writing 8 MiB into the socket buffers.
        async with asyncio.timeout(10):
            while response._buffered <= read_ahead:
                await asyncio.sleep(0.005)
        assert not response._connection._transport.is_reading()
        assert not sent.is_set()
        received, most = 0, 0
        while chunk := await response.read():
            received += len(chunk)
            most = max(most, response._buffered)
        assert received == size
        assert most <= read_ahead + 256 * 1024  # at most one socket read past the read-ahead
        assert sent.is_set()
        response.release()
        pool.close()


async def test_the_limit_holds_requests_until_a_response_is_released():
    async with serving(keep_alive_script) as (_server, origin):
        pool = pool_for(origin, limit=1)
        first = await pool.get("/o", {})
        second = asyncio.create_task(pool.get("/o", {}))
        await asyncio.sleep(0)  # let it start: it must wait for the one slot
        assert not second.done() and pool._slots.locked()
        assert await body_of(first) == b"x" * 1000
        first.release()
        response = await asyncio.wait_for(second, 5)
        assert await body_of(response) == b"x" * 1000
        response.release()
        pool.close()


async def test_a_header_value_with_a_line_break_is_refused():
    pool = pool_for("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="Range"):
        await pool.get("/o", {"Range": "bytes=0-1\r\nX-Injected: 1"})
    assert not pool._slots.locked()


async def test_https_origin_verifies_the_server_certificate(tmp_path):
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert_file, key_file)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer(b"secret bytes"))
                await writer.drain()
        writer.close()

    listener = await asyncio.start_server(script, "127.0.0.1", 0, ssl=server_side)
    port = listener.sockets[0].getsockname()[1]
    try:
        trusting = ssl.create_default_context(cafile=str(cert_file))
        pool = pool_for(f"https://localhost:{port}", ssl_context=trusting)
        for _ in range(2):  # the second over the pooled TLS connection
            response = await pool.get("/o", {})
            assert await body_of(response) == b"secret bytes"
            response.release()
        assert len(pool._idle) == 1
        pool.close()
        # A certificate the client does not trust is a failed connection, never an answer.
        stranger = pool_for(f"https://localhost:{port}", ssl_context=ssl.create_default_context())
        with pytest.raises(ConnectionFailed):
            await stranger.get("/o", {})
        stranger.close()
    finally:
        listener.close()
        await listener.wait_closed()
