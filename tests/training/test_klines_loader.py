"""The kline loader on generated zips (every format case) and on the real Binance files."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from training.generator import generate, kline_csv, simulate, write_zip
from training.klines import (
    FRAME_COLUMNS,
    ChecksumError,
    DataError,
    DataQualityError,
    load_klines,
)

H = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


def _frame(n: int = 48, seed: int = 1) -> pl.DataFrame:
    return simulate(T0 + H * np.arange(n, dtype=np.int64), H, seed)


def test_generated_zips_load_with_checksums(small_dataset: Path) -> None:
    klines = load_klines(small_dataset)
    assert klines.symbol == "BTCUSDT" and klines.interval == "1h"
    assert klines.frame.columns == list(FRAME_COLUMNS)
    assert klines.frame.schema["open_time"] == pl.Int64
    assert klines.frame.schema["trades"] == pl.Int64
    assert klines.frame.schema["close"] == pl.Float64
    assert klines.report.gaps == klines.report.duplicates == klines.report.anomalies == 0
    assert len(klines.files) == 6 and all(len(f.sha256) == 64 for f in klines.files)
    assert klines.frame["open_time"].is_sorted()


def test_checksum_mismatch_names_the_file(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "BTCUSDT-1h-2024-01.zip", kline_csv(_frame()))
    checksum = path.with_name(path.name + ".CHECKSUM")
    checksum.write_text("0" * 64 + "  " + path.name)
    with pytest.raises(ChecksumError, match=re.escape("BTCUSDT-1h-2024-01.zip")):
        load_klines(tmp_path)
    checksum.write_text("not a checksum")
    with pytest.raises(ChecksumError, match="malformed"):
        load_klines(tmp_path)
    checksum.unlink()  # no CHECKSUM beside it: nothing to verify
    assert load_klines(tmp_path).frame.height == 48


def test_header_is_sniffed_and_columns_are_positional(tmp_path: Path) -> None:
    frame = _frame()
    spot = tmp_path / "spot"
    futures = tmp_path / "um"
    write_zip(spot / "BTCUSDT-1h-2024-01.zip", kline_csv(frame))
    write_zip(futures / "BTCUSDT-1h-2024-01.zip", kline_csv(frame, market="um"))
    a, b = load_klines(spot), load_klines(futures)
    assert not a.files[0].had_header and b.files[0].had_header
    assert a.frame.equals(b.frame)


def test_bare_csv_and_ms_us_switch_across_new_year(tmp_path: Path) -> None:
    paths = generate(tmp_path, start="2024-12", end="2025-01", seed=5)
    with zipfile.ZipFile(paths[0]) as z:
        december = z.read("BTCUSDT-1h-2024-12.csv").split(b",", 1)[0]
    with zipfile.ZipFile(paths[1]) as z:
        january = z.read("BTCUSDT-1h-2025-01.csv")
    assert len(december) == 13 and len(january.split(b",", 1)[0]) == 16
    csv = tmp_path / "csv" / "BTCUSDT-1h-2025-01.csv"
    csv.parent.mkdir()
    csv.write_bytes(january)
    loaded = load_klines([paths[0], csv])
    times = loaded.frame["open_time"].to_numpy()
    assert np.all(np.diff(times) == H) and loaded.report.gaps == 0
    # 2024-12-01 00:00 and 2025-01-31 23:00 UTC, in ms
    assert times[0] == 1_733_011_200_000 and times[-1] == 1_738_364_400_000
    assert (loaded.frame["close_time"] - loaded.frame["open_time"] == H - 1).all()


def _anomalous(tmp_path: Path) -> Path:
    """One day of 1h bars with a gap, an off-grid bar, a zero-volume bar and a duplicate."""
    frame = _frame(24)
    frame = frame.filter(~pl.col("open_time").is_in([T0 + 5 * H, T0 + 6 * H]))  # gap: 2 bars
    off = frame.filter(pl.col("open_time") == T0 + 10 * H).with_columns(
        pl.col("open_time") + 1_694_789, pl.col("close_time") + 1_694_789
    )
    frame = pl.concat([frame.filter(pl.col("open_time") != T0 + 10 * H), off])
    frame = frame.with_columns(
        pl.when(pl.col("open_time") == T0 + 15 * H)
        .then(0.0)
        .otherwise(pl.col("volume"))
        .alias("volume")
    ).sort("open_time")
    path = tmp_path / "BTCUSDT-1h-2024-01-01.csv"
    duplicate = kline_csv(frame.filter(pl.col("open_time") == T0 + 20 * H))
    path.write_bytes(kline_csv(frame) + duplicate)
    return path


def test_quality_report_and_policies(tmp_path: Path) -> None:
    path = _anomalous(tmp_path)
    kept = load_klines(path, policy="keep")
    r = kept.report
    assert (r.rows, r.duplicates, r.gaps, r.missing_bars) == (23, 1, 1, 2)
    assert (r.off_grid, r.irregular_close, r.zero_volume) == (1, 0, 1)
    assert kept.frame.height == 22 and r.dropped == 0

    dropped = load_klines(path, policy="drop")
    assert dropped.frame.height == 20 and dropped.report.dropped == 2
    assert (dropped.frame["volume"] > 0).all()
    assert (dropped.frame["open_time"] % H == 0).all()

    with pytest.raises(DataQualityError, match="1 gaps"):
        load_klines(path, policy="fail")


def test_no_files_or_bad_zip(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape("no .zip or .csv")):
        load_klines(tmp_path)
    (tmp_path / "BTCUSDT-1h-2024-01.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip"):
        load_klines(tmp_path)


# ---- the real files (../shared/data/binance-vision), as their README states them

RealFile = Callable[[str], Path]


@pytest.mark.realdata
def test_real_2018_gaps_and_off_grid_bars(real_file: RealFile) -> None:
    path = real_file("jamado95__whatever/BTCUSDT-1h-2018-01.csv")
    r = load_klines(path, policy="keep").report
    assert (r.rows, r.duplicates, r.gaps, r.missing_bars) == (8699, 0, 7, 61)
    assert (r.off_grid, r.irregular_close) == (43, 4)
    dropped = load_klines(path, policy="drop")
    assert dropped.report.dropped == 46  # one off-grid bar also has a truncated close_time
    assert (dropped.frame["open_time"] % H == 0).all()


@pytest.mark.realdata
def test_real_2023_halt(real_file: RealFile) -> None:
    klines = load_klines(real_file("jamado95__whatever/BTCUSDT-1h-2023-01.csv"), policy="keep")
    r = klines.report
    assert (r.gaps, r.missing_bars, r.zero_volume, r.irregular_close) == (1, 1, 1, 1)
    halt = klines.frame.filter(pl.col("open_time") == 1_679_659_200_000)  # 2023-03-24 12:00
    assert halt["volume"][0] == 0 and halt["close_time"][0] == 1_679_661_581_646
    assert klines.frame.filter(pl.col("open_time") == 1_679_662_800_000).is_empty()  # 13:00
    dropped = load_klines(real_file("jamado95__whatever/BTCUSDT-1h-2023-01.csv"))
    assert dropped.report.dropped == 1 and dropped.frame.height == 8758


@pytest.mark.realdata
def test_real_2025_microseconds(real_file: RealFile) -> None:
    for name in ("BTCUSDT-1h-2025-01.csv", "ETHUSDT-1h-2025-01.csv"):
        klines = load_klines(real_file(f"jamado95__whatever/{name}"), policy="fail")
        assert klines.frame["open_time"][0] == 1_735_689_600_000
        assert klines.frame["close_time"][0] == 1_735_693_199_999
        assert klines.frame.height == 8760


@pytest.mark.realdata
def test_real_futures_header_and_custom_header(real_file: RealFile) -> None:
    near = load_klines(real_file("owlacar-dotcom__isda/NEARUSDT-1m-2025-02.csv"), policy="fail")
    assert near.files[0].had_header and near.interval == "1m" and near.frame.height == 40320
    assert near.frame["open_time"][0] == 1_738_368_000_000  # futures stayed in ms in 2025
    custom = load_klines(real_file("intabyu__interview-at/BTCUSDT-1h-2023-01.csv"))
    plain = load_klines(real_file("jamado95__whatever/BTCUSDT-1h-2023-01.csv"))
    assert custom.files[0].had_header
    assert custom.frame.equals(plain.frame.head(744))


@pytest.mark.realdata
def test_real_zero_volume_bars(real_file: RealFile) -> None:
    path = real_file("jamado95__whatever/BTCUSDC-5m-2018-12.csv")
    assert load_klines(path, policy="keep").report.zero_volume == 196
    assert load_klines(path, policy="drop").frame.height == 4858 - 196
