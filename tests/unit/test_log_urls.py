"""URLs shown to people lose their credentials: userinfo and query strings (issue 13, finding 15)."""

from __future__ import annotations

import pytest

from edgert.log import display_url, scrub_urls


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pass@registry.example/metadata/", "https://registry.example/metadata/"),
        ("https://user:p%40ss@host:8443/x.json?token=abc#frag", "https://host:8443/x.json?..."),
        ("https://u:p@ss@host/", "https://host/"),
        ("http://[::1]:8080/r?sig=1", "http://[::1]:8080/r?..."),
        ("https://host/plain/path", "https://host/plain/path"),
        ("https://host", "https://host"),
        ("/var/lib/edgert/registry", "/var/lib/edgert/registry"),
        ("relative/dir", "relative/dir"),
        ("http://[::1/x", "<invalid url>"),
    ],
)
def test_display_url_drops_userinfo_and_query(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_display_url_is_idempotent() -> None:
    once = display_url("https://a:b@h/x?k=v")
    assert display_url(once) == once


@pytest.mark.parametrize(
    "text",
    [
        "registry unreachable: https://alice:s3cret@reg.example/metadata/timestamp.json?token=TOKEN1",
        "HTTPSConnectionPool(host='reg.example', port=443): Max retries exceeded with url: "
        "/metadata/1.root.json?token=TOKEN1 (Caused by NewConnectionError('refused'))",
        "fetch failed (https://alice:s3cret@reg.example/targets/m.gguf?X-Amz-Signature=TOKEN1)",
        "Request URL 'https://alice:s3(cret@reg.example/x'",
        "two: https://alice:s3cret@a.example/ and ftp://bob:s3cret@b.example/f?token=TOKEN1.",
    ],
)
def test_scrub_urls_removes_secrets_from_free_text(text: str) -> None:
    clean = scrub_urls(text)
    assert "s3cret" not in clean
    assert "s3(cret" not in clean
    assert "TOKEN1" not in clean
    assert "alice" not in clean
    assert "bob" not in clean


def test_scrub_urls_keeps_the_useful_part() -> None:
    text = "download of https://u:p@reg.example:8443/targets/m.gguf?sig=x failed: timed out"
    assert scrub_urls(text) == "download of https://reg.example:8443/targets/m.gguf?... failed: timed out"
    assert scrub_urls("no url here: /etc/edgert/edgert.toml") == "no url here: /etc/edgert/edgert.toml"
