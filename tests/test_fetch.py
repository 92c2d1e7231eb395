"""Image URLs and admission without Ray: the allowlist on path-segment boundaries after
normalising, downloads bounded in bytes and in total seconds against a local upstream on
127.0.0.1, control characters refused, and the bounded pools and pixel budget."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from sav_ray.serving.admission import BoundedPool, Busy, PixelBudget
from sav_ray.serving.fetch import (
    FetchError,
    FetchTooLarge,
    UrlPrefix,
    UrlRefused,
    allowed_url,
    download,
)
from sav_ray.serving.requests import (
    ImageSources,
    RequestError,
    RequestLimits,
    image_bytes,
    refuse_control_characters,
    to_examples,
)

PREFIXES = [UrlPrefix.parse("http://img.test/ok/"), UrlPrefix.parse("https://cdn.test:8443/a/b")]


@pytest.mark.parametrize(
    "url, normalised",
    [
        ("http://img.test/ok/cat.png", "http://img.test/ok/cat.png"),
        ("HTTP://IMG.test:80/ok/sub/cat.png", "http://img.test/ok/sub/cat.png"),
        ("http://img.test/ok/my%20cat.png?v=2#frag", "http://img.test/ok/my%20cat.png?v=2"),
        ("http://img.test/ok/%63at.png", "http://img.test/ok/cat.png"),
        ("https://cdn.test:8443/a/b/c.png", "https://cdn.test:8443/a/b/c.png"),
    ],
)
def test_allowed_urls_are_fetched_as_normalised(url, normalised):
    assert allowed_url(url, PREFIXES).normalised() == normalised


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://img.test/ok/../no/secret.png", "'..' segment"),
        ("http://img.test/ok/./cat.png", "'..' segment"),
        ("http://img.test/ok/%2e%2e/no/secret.png", "percent-encoded"),
        ("http://img.test/ok/%2E%2E/no/secret.png", "percent-encoded"),
        ("http://img.test/ok/..%2fno/secret.png", "percent-encoded"),
        ("http://img.test/ok/..%5cno/secret.png", "percent-encoded"),
        ("http://img.test/ok/a%00.png", "percent-encoded"),
        ("http://img.test/ok//etc/passwd", "empty"),
        ("http://img.test/ok\\..\\no/secret.png", "backslash"),
        ("http://img.test/okay.png", "not under an allowed URL prefix"),
        ("http://img.test/ok", "not under an allowed URL prefix"),
        ("http://img.test/ok/", "empty"),
        ("http://img.test:81/ok/cat.png", "not under an allowed URL prefix"),
        ("https://img.test/ok/cat.png", "not under an allowed URL prefix"),
        ("http://evil.test/ok/cat.png", "not under an allowed URL prefix"),
        ("http://img.test@evil.test/ok/cat.png", "user information"),
        ("http://user:pw@img.test/ok/cat.png", "user information"),
        ("https://cdn.test:8443/a/bc/x.png", "not under an allowed URL prefix"),
        ("http://img.test/ok/cat.png\x00", "control character"),
        ("http://img.test/ok/c at.png", "control character or a space"),
        ("http://img.test/ok/cat.png\r\nHost: evil", "control character"),
        ("http://img.test/ok/%0d%0a.png", "decodes to a control character"),
        ("http://img.test/ok/%zz.png", "two hex digits"),
        ("http://img.test/ok/%ff.png", "UTF-8"),
        ("http://img.test:99999/ok/cat.png", "cannot be parsed"),
        ("ftp://img.test/ok/cat.png", "only http and https"),
    ],
)
def test_bypass_attempts_are_refused_from_the_url_alone(url, words):
    with pytest.raises(UrlRefused, match=re.escape(words)):
        allowed_url(url, PREFIXES)


def test_prefixes_are_checked_when_configured():
    for bad in ("http://img.test/ok/../", "http://u@img.test/", "http://img.test/a?b=1"):
        with pytest.raises(ValueError, match="allowed URL prefix"):
            UrlPrefix.parse(bad)
    with pytest.raises(ValueError, match="image_sources.url_deadline_s must be positive"):
        ImageSources(url_deadline_s=0)


@pytest.fixture(scope="module")
def upstream(loopback_http):
    """/ok/a.png (bytes), /ok/drip (64 bytes/s under a 100 MB length), /ok/huge (a 100 MB
    Content-Length), /ok/stream (20 kB without a length)."""

    def stream(handler, stop):
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(b"y" * 20_000)

    def huge(handler, stop):
        handler.send_response(200)
        handler.send_header("Content-Length", str(100 * 2**20))
        handler.end_headers()

    server = loopback_http(
        {
            "/ok/a.png": b"PNGDATA" * 10,
            "/ok/drip": loopback_http.drip(100 * 2**20),
            "/ok/huge": huge,
            "/ok/stream": stream,
        }
    )
    yield server.url
    server.close()


def fetch(upstream, path, **kwargs):
    parsed = allowed_url(upstream + path, [UrlPrefix.parse(upstream + "/ok/")])
    options = {"max_bytes": 1000, "seconds": 5.0, "read_timeout": 5.0, **kwargs}
    return download(parsed, **options)


def test_downloads_are_bounded_in_bytes_and_in_total_time(upstream):
    assert fetch(upstream, "/ok/a.png") == b"PNGDATA" * 10
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(upstream, "/ok/missing.png")
    with pytest.raises(FetchTooLarge, match="Content-Length is 104857600 bytes"):
        fetch(upstream, "/ok/huge")
    with pytest.raises(FetchTooLarge, match="over the limit of 1000 bytes"):
        fetch(upstream, "/ok/stream")
    assert len(fetch(upstream, "/ok/stream", max_bytes=20_000)) == 20_000

    # each read gets data in time (16 bytes every 0.25 s): only the deadline stops it
    started = time.monotonic()
    with pytest.raises(FetchError, match="did not finish within 1.5 s"):
        fetch(upstream, "/ok/drip", max_bytes=200 * 2**20, seconds=1.5)
    assert time.monotonic() - started < 4


def test_a_request_shares_one_fetch_deadline_over_its_images(upstream):
    sources = ImageSources(
        allowed_url_prefixes=(upstream + "/ok/",), url_deadline_s=60, request_fetch_s=1.0
    )
    limits = RequestLimits(max_image_bytes=200 * 2**20, max_request_fetch_bytes=600 * 2**20)
    started = time.monotonic()
    with pytest.raises(RequestError) as caught:
        to_examples([("q", [upstream + "/ok/drip"] * 3)], limits, sources)
    assert caught.value.status == 400 and "inputs[0].images[0]" in caught.value.message
    assert time.monotonic() - started < 4


def test_control_characters_are_refused_naming_the_field(tmp_path):
    sources = ImageSources(allowed_paths=(str(tmp_path),), allowed_url_prefixes=("http://h/ok/",))
    for source in (f"file://{tmp_path}/a.png\x00", "file:///etc/passwd\x00", "http://h/ok/a b"):
        with pytest.raises(RequestError) as caught:
            image_bytes(source, sources, RequestLimits(), "inputs[1].images[0]")
        assert caught.value.status == 400
        assert caught.value.message.startswith("inputs[1].images[0]: ")
    with pytest.raises(
        RequestError, match=r"inputs\[0\].text: holds the control character U\+0000"
    ):
        to_examples([("a\x00b", [])], RequestLimits())
    refuse_control_characters("line one\nline\ttwo\r\n", "text", text=True)  # allowed in text
    with pytest.raises(RequestError, match="model: holds the control character U\\+000A"):
        refuse_control_characters("shapes\n", "model")


def test_a_full_pool_refuses_at_once_and_frees_its_places():
    async def scenario():
        pool = BoundedPool("fetch", workers=1, queue=1)
        gate = threading.Event()
        first = asyncio.ensure_future(pool.run(gate.wait, 10))
        second = asyncio.ensure_future(pool.run(gate.wait, 10))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy, match="fetch pool holds 2 requests"):
            await pool.run(time.sleep, 0)
        gate.set()
        assert await first and await second
        assert await pool.run(lambda: 7) == 7
        return pool.stats()

    stats = asyncio.run(scenario())
    assert stats == {"workers": 1, "capacity": 2, "admitted": 0, "refused": 1}


def test_the_pixel_budget_makes_requests_wait_then_refuses():
    budget = PixelBudget(100, wait_s=0.2)
    with budget.lease() as a:
        a.reserve(60)
        with budget.lease() as b:
            started = time.monotonic()
            with pytest.raises(Busy, match="60 decoded pixels of its budget of 100"):
                b.reserve(50)
            assert time.monotonic() - started >= 0.2
            b.reserve(40)
            assert budget.used == 100

        def release_soon():
            time.sleep(0.05)
            a.__exit__(None, None, None)

        threading.Thread(target=release_soon).start()
        with budget.lease() as c:
            c.reserve(100)  # waits for `a` to give its pixels back
    late = budget.lease()
    with late:
        pass
    with pytest.raises(Busy, match="request ended"):
        late.reserve(10)  # a decoding thread that outlived its request
    assert budget.stats() == {"pixels": 100, "used": 0, "peak": 100, "refused": 1}
