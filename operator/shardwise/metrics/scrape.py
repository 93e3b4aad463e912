"""Fetching the trainer pods' stats pages: bounded concurrency, short timeouts, failures reported."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp


async def fetch_pages(
    session: aiohttp.ClientSession,
    urls: Mapping[str, str],
    *,
    limit: asyncio.Semaphore,
    timeout_seconds: float = 3.0,
) -> dict[str, str | BaseException | None]:
    """GET every URL (pod name -> URL); a pod that does not answer maps to its exception."""

    async def one(url: str) -> str | BaseException | None:
        async with limit:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_seconds)) as response:
                    if response.status != 200:
                        return RuntimeError(f"HTTP {response.status} from {url}")
                    return await response.text()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return exc

    names = list(urls)
    results = await asyncio.gather(*(one(urls[name]) for name in names))
    return dict(zip(names, results, strict=True))
