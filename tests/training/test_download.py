"""Downloads against a Binance Vision look-alike on 127.0.0.1 (never the real internet)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from training.__main__ import main
from training.download import DownloadError, download_klines, monthly_kline_path
from training.generator import generate
from training.klines import load_klines

LAYOUT = "data/spot/monthly/klines/BTCUSDT/1h"


class _Handler(SimpleHTTPRequestHandler):
    """Static files with single-range support; records every request."""

    log: list[tuple[str, str | None]]
    corrupt_left: int

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.log.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        if path.name.endswith(".zip") and type(self).corrupt_left > 0:
            type(self).corrupt_left -= 1
            body = body[:-1] + bytes([body[-1] ^ 1])
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, type[_Handler], Path]]:
    root = tmp_path / "mirror"
    generate(root / LAYOUT, start="2024-01", end="2024-02", seed=2)
    handler = type("Handler", (_Handler,), {"log": [], "corrupt_left": 0})

    def factory(*args: object, **kwargs: object) -> _Handler:
        return handler(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

    server = ThreadingHTTPServer(("127.0.0.1", 0), factory)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler, root / LAYOUT
    finally:
        server.shutdown()
        server.server_close()


def test_url_layout() -> None:
    assert monthly_kline_path("spot", "btcusdt", "1h", "2024-01") == (
        f"{LAYOUT}/BTCUSDT-1h-2024-01.zip"
    )
    assert monthly_kline_path("um", "BTCUSDT", "1m", "2024-01").startswith(
        "data/futures/um/monthly/klines/BTCUSDT/1m/"
    )


def test_download_verify_and_cache(
    mirror: tuple[str, type[_Handler], Path], tmp_path: Path
) -> None:
    url, handler, source = mirror
    out = tmp_path / "out"
    paths = download_klines("BTCUSDT", "1h", "2024-01", "2024-02", out, base_url=url)
    assert [p.read_bytes() for p in paths] == [(source / p.name).read_bytes() for p in paths]
    assert load_klines(out).frame.height == 744 + 696
    requests = len(handler.log)
    download_klines("BTCUSDT", "1h", "2024-01", "2024-02", out, base_url=url)
    assert len(handler.log) == requests  # verified files are not fetched again


def test_resume_with_range(mirror: tuple[str, type[_Handler], Path], tmp_path: Path) -> None:
    url, handler, source = mirror
    out = tmp_path / "out"
    out.mkdir()
    whole = (source / "BTCUSDT-1h-2024-01.zip").read_bytes()
    (out / "BTCUSDT-1h-2024-01.zip.part").write_bytes(whole[:1000])
    [path] = download_klines("BTCUSDT", "1h", "2024-01", "2024-01", out, base_url=url)
    assert path.read_bytes() == whole
    assert (f"/{LAYOUT}/BTCUSDT-1h-2024-01.zip", "bytes=1000-") in handler.log


def test_checksum_mismatch_retries_once_then_fails(
    mirror: tuple[str, type[_Handler], Path], tmp_path: Path
) -> None:
    url, handler, _ = mirror
    handler.corrupt_left = 1  # a transient bad copy: fetched again, then fine
    download_klines("BTCUSDT", "1h", "2024-01", "2024-01", tmp_path / "a", base_url=url)
    zips = [p for p, _ in handler.log if p.endswith(".zip")]
    assert len(zips) == 2

    handler.corrupt_left = 10  # always bad: fail loudly, keep nothing
    with pytest.raises(DownloadError, match=r"checksum mismatch for .*BTCUSDT-1h-2024-01\.zip"):
        download_klines("BTCUSDT", "1h", "2024-01", "2024-01", tmp_path / "b", base_url=url)
    assert list((tmp_path / "b").iterdir()) == []


def test_not_published(mirror: tuple[str, type[_Handler], Path], tmp_path: Path) -> None:
    url, _, _ = mirror
    with pytest.raises(DownloadError, match="not published"):
        download_klines("BTCUSDT", "1h", "2024-03", "2024-03", tmp_path, base_url=url)


def test_offline_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["data", "--start", "2024-01", "--end", "2024-01", "--out", str(tmp_path)]
    assert main([*args, "--base-url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach") and "offline?" in err and "\n" not in err
