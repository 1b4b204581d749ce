"""Remote image URLs against real HTTP servers: nginx for plain files, a stdlib server for what nginx
will not do on cue (redirects, a body without Content-Length, a trickle).

Nothing is fetched unless ``serve.media_url_hosts`` names the host (scheme and port included); what is
fetched is bounded in bytes while it streams and in time as a whole.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from edgert.api.schemas import ChatCompletionRequest
from edgert.errors import BadRequestError, PayloadTooLargeError
from edgert.media import MediaInput, MediaLimits, collect_media
from edgert.media.remote import parse_host_entry
from tests.integration.http_host import NginxHost


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, "JPEG")
    return out.getvalue()


def image_url(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def fetch_image(url: str, *hosts: str, max_bytes: int = 1 << 20, timeout_s: float = 10.0) -> MediaInput:
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, image_url(url)]}]}
    )
    limits = MediaLimits(
        max_bytes=max_bytes, url_hosts=tuple(parse_host_entry(h) for h in hosts), url_timeout_s=timeout_s
    )
    (image,) = collect_media(body.messages, limits)
    return image


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxHost]:
    root = tmp_path_factory.mktemp("site")
    (root / "shelf.jpg").write_bytes(jpeg(320, 240))
    (root / "big.jpg").write_bytes(jpeg(320, 240) + bytes(2 << 20))  # 2 MiB past the JPEG's end
    for path in root.iterdir():
        path.chmod(0o644)
    with NginxHost(root, tmp_path_factory.mktemp("nginx")) as host:
        yield host


def test_an_allowlisted_host_is_fetched_and_decoded(nginx: NginxHost) -> None:
    image = fetch_image(f"{nginx.url}shelf.jpg", f"http://127.0.0.1:{nginx.port}")
    assert (image.kind, image.format, image.width, image.height) == ("image", "jpeg", 320, 240)
    assert "GET /shelf.jpg" in nginx.access_log()


def test_nothing_is_fetched_unless_scheme_host_and_port_are_allowed(nginx: NginxHost) -> None:
    before = nginx.access_log()
    url = f"{nginx.url}shelf.jpg"
    for hosts in [(), (f"127.0.0.1:{nginx.port}",), ("http://127.0.0.1",), (f"http://localhost:{nginx.port}",)]:
        with pytest.raises(BadRequestError, match="remote image URLs are refused") as caught:
            fetch_image(url, *hosts)  # https only / another port / another name for the same address
        assert caught.value.param == "messages.0.content.1"
    assert nginx.access_log() == before


def test_an_http_error_is_a_400_naming_the_part(nginx: NginxHost) -> None:
    with pytest.raises(BadRequestError, match="HTTP 404") as caught:
        fetch_image(f"{nginx.url}missing.jpg", f"http://127.0.0.1:{nginx.port}")
    assert caught.value.param == "messages.0.content.1"


def test_a_body_announced_too_large_is_a_413(nginx: NginxHost) -> None:
    with pytest.raises(PayloadTooLargeError) as caught:
        fetch_image(f"{nginx.url}big.jpg", f"http://127.0.0.1:{nginx.port}", max_bytes=1 << 20)
    assert caught.value.http_status == 413 and caught.value.param == "messages.0.content.1"


def test_an_unreachable_host_is_a_400(tmp_path: Path) -> None:
    host = NginxHost(tmp_path, tmp_path / "down")  # a port picked, nothing listening on it
    with pytest.raises(BadRequestError, match="fetching the image failed"):
        fetch_image(f"{host.url}shelf.jpg", f"http://127.0.0.1:{host.port}")


# ------------------------------------------------------------ a server that misbehaves on cue
class Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, Any]] = {}
    #: bytes a streamed body got out before the client hung up
    streamed: ClassVar[list[int]] = []
    hung_up = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404)
        elif route[0] == "redirect":
            self.send_response(302)
            self.send_header("Location", route[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route[0] == "file":
            self.send_response(200)
            self.send_header("Content-Length", str(len(route[1])))
            self.end_headers()
            self.wfile.write(route[1])
        elif route[0] == "endless":  # no Content-Length: the body ends when the connection does
            self.close_connection = True
            self.send_response(200)
            self.end_headers()
            sent = 0
            try:
                while sent < 256 << 20:
                    self.wfile.write(bytes(64 << 10))
                    sent += 64 << 10
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.streamed.append(sent)
            self.hung_up.set()
        elif route[0] == "trickle":  # a byte at a time: every read is quick, the whole never ends
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.05)  # the misbehaviour under test, not a synchronisation
            except (BrokenPipeError, ConnectionResetError):
                pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    port = httpd.server_address[1]
    Handler.routes.update(
        {
            "/shelf.jpg": ("file", jpeg(64, 48)),
            "/moved": ("redirect", "/shelf.jpg"),
            "/loop": ("redirect", "/loop"),
            "/elsewhere": ("redirect", f"http://localhost:{port}/shelf.jpg"),
            "/endless": ("endless",),
            "/trickle": ("trickle",),
        }
    )
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()
    httpd.server_close()


def test_a_redirect_on_the_same_host_is_followed(server: str) -> None:
    image = fetch_image(f"{server}/moved", server)
    assert (image.width, image.height) == (64, 48)


def test_a_redirect_to_another_host_is_refused_even_an_allowed_one(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    with pytest.raises(BadRequestError, match="off the allowed host"):
        fetch_image(f"{server}/elsewhere", server, f"http://localhost:{port}")


def test_redirects_are_bounded(server: str) -> None:
    with pytest.raises(BadRequestError, match="redirects more than 3 times"):
        fetch_image(f"{server}/loop", server)


def test_the_size_limit_holds_while_streaming_a_body_without_length(server: str) -> None:
    Handler.hung_up.clear()
    with pytest.raises(PayloadTooLargeError):
        fetch_image(f"{server}/endless", server, max_bytes=256 << 10)
    assert Handler.hung_up.wait(30)
    assert Handler.streamed[-1] < 256 << 20  # the client stopped reading and hung up long before the end


def test_a_trickling_body_runs_into_the_whole_fetch_timeout(server: str) -> None:
    with pytest.raises(BadRequestError, match="took longer than the timeout"):
        fetch_image(f"{server}/trickle", server, timeout_s=0.5)


def test_the_same_image_inline_or_fetched_has_the_same_cache_key(server: str) -> None:
    inline = base64.b64encode(jpeg(64, 48)).decode()
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [image_url(f"data:image/jpeg;base64,{inline}")]}]}
    )
    (inline_image,) = collect_media(body.messages, MediaLimits())
    assert fetch_image(f"{server}/shelf.jpg", server).digest == inline_image.digest
