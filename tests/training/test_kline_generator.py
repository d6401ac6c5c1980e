"""The offline generator writes Binance's exact format, deterministically."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from training.generator import generate
from training.klines import load_klines


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", start="2024-11", end="2025-01", seed=3)
    b = generate(tmp_path / "b", start="2024-11", end="2025-01", seed=3)
    c = generate(tmp_path / "c", start="2024-11", end="2025-01", seed=4)
    for x, y in zip(a, b, strict=True):
        assert x.read_bytes() == y.read_bytes()
        assert Path(f"{x}.CHECKSUM").read_bytes() == Path(f"{y}.CHECKSUM").read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()


def test_binance_format(tmp_path: Path) -> None:
    paths = generate(tmp_path, start="2024-12", end="2025-01", seed=3)
    assert [p.name for p in paths] == ["BTCUSDT-1h-2024-12.zip", "BTCUSDT-1h-2025-01.zip"]
    checksum = Path(f"{paths[0]}.CHECKSUM").read_text()
    assert not checksum.endswith("\n") and checksum.endswith("  BTCUSDT-1h-2024-12.zip")
    for path, unit in zip(paths, (1, 1000), strict=True):
        with zipfile.ZipFile(path) as z:
            assert z.namelist() == [path.stem + ".csv"]
            text = z.read(path.stem + ".csv").decode()
        assert text.endswith("\n") and "\r" not in text
        rows = [line.split(",") for line in text.splitlines()]
        assert len(rows) == 744 and all(len(r) == 12 for r in rows)
        assert all(r[11] == "0" for r in rows)
        assert all(len(v.split(".")[1]) == 8 for r in rows for v in [*r[1:6], r[7], r[9], r[10]])
        opens = np.array([int(r[0]) for r in rows])
        closes = np.array([int(r[6]) for r in rows])
        assert np.all(closes == opens + 3_600_000 * unit - 1)


def test_candles_are_consistent(small_dataset: Path) -> None:
    f = load_klines(small_dataset).frame
    assert (f["low"] <= f[["open", "close"]].min_horizontal()).all()
    assert (f["high"] >= f[["open", "close"]].max_horizontal()).all()
    assert (f["taker_buy_base_volume"] <= f["volume"]).all()
    vwap = f["quote_volume"] / f["volume"]
    assert ((vwap >= f["low"] * 0.999) & (vwap <= f["high"] * 1.001)).all()
    returns = np.diff(np.log(f["close"].to_numpy()))
    # Volatility clustering: |returns| are autocorrelated.
    a = np.abs(returns)
    assert np.corrcoef(a[:-1], a[1:])[0, 1] > 0.1
