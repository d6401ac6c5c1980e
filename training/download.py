"""Download Binance Vision monthly klines with their CHECKSUMs, resumably and verified.

Files land as ``<out>/<SYM>-<interval>-<YYYY>-<MM>.zip`` with ``.zip.CHECKSUM`` beside them, the
layout :func:`training.klines.load_klines` reads. A partial download (``.zip.part``) is resumed
with an HTTP Range request. Every zip is checked against its CHECKSUM; on a mismatch both files
are fetched again once, and a second mismatch is an error. A file already present and verified is
not fetched again. The base URL can point to a mirror (``--base-url`` or the environment variable
:data:`BASE_URL_ENV`), which is how the tests serve files from loopback.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from training.generator import month_starts
from training.klines import ChecksumError, DataError, checksum_path, verify_checksum

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://data.binance.vision"
BASE_URL_ENV = "XYLEN_BINANCE_VISION_URL"
_MARKET_PATHS = {"spot": "data/spot", "um": "data/futures/um", "cm": "data/futures/cm"}
_BLOCK = 1 << 16


class DownloadError(DataError):
    """A file could not be downloaded (offline, not published, or failing its checksum)."""


def monthly_kline_path(market: str, symbol: str, interval: str, month: str) -> str:
    """URL path of a monthly kline zip, e.g. ``data/spot/monthly/klines/BTCUSDT/1h/...zip``."""
    try:
        root = _MARKET_PATHS[market]
    except KeyError:
        known = ", ".join(_MARKET_PATHS)
        raise DownloadError(f"unknown market {market!r}; use one of {known}") from None
    symbol = symbol.upper()
    name = f"{symbol}-{interval}-{month}.zip"
    return f"{root}/monthly/klines/{symbol}/{interval}/{name}"


def _open(url: str, timeout: float, offset: int = 0) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": "xylen-training"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise DownloadError(f"{url} is not published (HTTP 404)") from None
        if exc.code == 416 and offset:  # nothing left to send: the partial file is complete
            raise
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot reach {url} ({reason}); offline? point --base-url or "
            f"{BASE_URL_ENV} at a reachable mirror"
        ) from None


def fetch(url: str, dest: Path, *, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest``, resuming a ``<dest>.part`` left by an interrupted run."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, timeout, offset)
    except urllib.error.HTTPError:  # 416: the part already holds the whole file
        os.replace(part, dest)
        return dest
    with response:
        resumed = offset > 0 and response.status == 206
        if offset and not resumed:
            logger.info("%s: server ignored the range request; downloading from the start", url)
        with part.open("ab" if resumed else "wb") as fh:
            try:
                for block in iter(lambda: response.read(_BLOCK), b""):
                    fh.write(block)
            except OSError as exc:
                raise DownloadError(
                    f"{url}: connection lost ({exc}); run again to resume"
                ) from None
    os.replace(part, dest)
    return dest


def download_month(base_url: str, path: str, out: Path, *, timeout: float = 30.0) -> Path:
    """Fetch one zip and its CHECKSUM into ``out`` and verify them (one retry on mismatch)."""
    name = path.rsplit("/", 1)[-1]
    dest = out / name
    url = f"{base_url.rstrip('/')}/{path}"
    for attempt in (1, 2):
        if not checksum_path(dest).exists():
            fetch(url + ".CHECKSUM", checksum_path(dest), timeout=timeout)
        if not dest.exists():
            fetch(url, dest, timeout=timeout)
        try:
            verify_checksum(dest)
            return dest
        except ChecksumError as exc:
            dest.unlink(missing_ok=True)
            checksum_path(dest).unlink(missing_ok=True)
            if attempt == 2:
                raise DownloadError(f"{exc} (after downloading it again)") from None
            logger.warning("%s; downloading it again", exc)
    raise AssertionError("unreachable")


def download_klines(
    symbol: str,
    interval: str,
    start: str,
    end: str,
    out: Path,
    *,
    base_url: str | None = None,
    market: str = "spot",
    timeout: float = 30.0,
) -> list[Path]:
    """Download and verify the monthly zips ``start`` .. ``end`` (``YYYY-MM``) into ``out``."""
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for moment in month_starts(start, end):
        path = monthly_kline_path(market, symbol, interval, f"{moment:%Y-%m}")
        paths.append(download_month(base, path, out, timeout=timeout))
        logger.info("verified %s", paths[-1])
    return paths
