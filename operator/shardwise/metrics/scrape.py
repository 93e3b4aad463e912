"""Fetching the trainer pods' stats pages: bounded concurrency, short timeouts, a byte cap per page."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final

import aiohttp

from shardwise.metrics.limits import DEFAULT_STATS_MAX_BYTES

__all__ = ["DEFAULT_STATS_MAX_BYTES", "PageTooLargeError", "fetch_pages", "read_capped"]

_CHUNK: Final = 64 * 1024


class PageTooLargeError(Exception):
    """The stats page exceeded the byte cap (the read stopped there)."""

    def __init__(self, url: str, limit: int) -> None:
        super().__init__(f"the page at {url} is larger than {limit} bytes (--stats-max-bytes)")
        self.limit = limit


async def read_capped(response: aiohttp.ClientResponse, url: str, max_bytes: int) -> bytes:
    """The body, read chunk by chunk; PageTooLargeError as soon as it passes max_bytes."""
    if response.content_length is not None and response.content_length > max_bytes:
        raise PageTooLargeError(url, max_bytes)
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(_CHUNK)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > max_bytes:
            raise PageTooLargeError(url, max_bytes)
        parts.append(chunk)


async def fetch_pages(
    session: aiohttp.ClientSession,
    urls: Mapping[str, str],
    *,
    limit: asyncio.Semaphore,
    timeout_seconds: float = 3.0,
    max_bytes: int = DEFAULT_STATS_MAX_BYTES,
) -> dict[str, str | BaseException | None]:
    """GET every URL (pod name -> URL); a pod that does not answer maps to its exception."""

    async def one(url: str) -> str | BaseException | None:
        async with limit:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_seconds)) as response:
                    if response.status != 200:
                        return RuntimeError(f"HTTP {response.status} from {url}")
                    body = await read_capped(response, url, max_bytes)
                    return body.decode("utf-8", "replace")  # the text format is UTF-8 by definition
            except (aiohttp.ClientError, TimeoutError, OSError, PageTooLargeError) as exc:
                return exc

    names = list(urls)
    results = await asyncio.gather(*(one(urls[name]) for name in names))
    return dict(zip(names, results, strict=True))
