"""Load Binance Vision kline files exactly as published, with a data-quality report.

Accepts monthly or daily ``.zip`` archives (one CSV inside) and bare ``.csv`` files, spot and
USD-M futures, with or without a header row (sniffed: a first line whose first field is not all
digits is skipped; columns are mapped by position, never by the header's names). Open and close
times are normalised per value to epoch milliseconds (spot files use microseconds from
2025-01-01). A ``<zip>.CHECKSUM`` beside a zip is verified; a mismatch raises
:class:`ChecksumError` naming the file.

Rows are sorted and de-duplicated on ``open_time``. Gaps (halts, maintenance) are reported and
never filled. Anomalous bars -- off the interval grid, with an irregular close_time, or with zero
volume -- are handled by an :class:`AnomalyPolicy`.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import polars as pl

from training.metadata import sha256_file

#: The 12 columns of a kline CSV, by position.
KLINE_COLUMNS = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "trades",
    "taker_buy_base_volume",
    "taker_buy_quote_volume",
    "ignore",
)
_INT_COLUMNS = frozenset({"open_time", "close_time", "trades"})
_SCHEMA = {name: pl.Int64 if name in _INT_COLUMNS else pl.Float64 for name in KLINE_COLUMNS}
#: Columns of the loaded frame (``ignore`` dropped).
FRAME_COLUMNS = KLINE_COLUMNS[:-1]

_MINUTE = 60_000
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR
#: Fixed-length Binance intervals in milliseconds (``1mo`` has no fixed length: unsupported).
INTERVAL_MS: dict[str, int] = {
    "1s": 1_000,
    "1m": _MINUTE,
    "3m": 3 * _MINUTE,
    "5m": 5 * _MINUTE,
    "15m": 15 * _MINUTE,
    "30m": 30 * _MINUTE,
    "1h": _HOUR,
    "2h": 2 * _HOUR,
    "4h": 4 * _HOUR,
    "6h": 6 * _HOUR,
    "8h": 8 * _HOUR,
    "12h": 12 * _HOUR,
    "1d": _DAY,
    "3d": 3 * _DAY,
    "1w": 7 * _DAY,
}
#: Offset of the grid from the epoch: weekly bars open on Mondays (1970-01-05).
_GRID_OFFSET_MS = {"1w": 4 * _DAY}
#: Times at or above this are microseconds (16 digits); below, milliseconds (13 digits).
MICROS_THRESHOLD = 10**15

_NAME_RE = re.compile(
    r"^(?P<symbol>[A-Z0-9_]+)-(?P<interval>\d+(?:mo|[smhdw]))-(?P<date>\d{4}-\d{2}(?:-\d{2})?)$"
)


class DataError(ValueError):
    """Kline input that cannot be trusted: unreadable, inconsistent or failing a check."""


class ChecksumError(DataError):
    """A zip does not match the sha256 in its ``.CHECKSUM`` file."""


class DataQualityError(DataError):
    """The data has anomalies and the policy is :attr:`AnomalyPolicy.FAIL`."""


class AnomalyPolicy(StrEnum):
    """What to do with anomalous bars (off-grid, irregular close_time, zero volume)."""

    DROP = "drop"
    """Remove them; the holes they leave are gaps like any other (labels will not cross them)."""
    KEEP = "keep"
    """Keep them as published."""
    FAIL = "fail"
    """Raise :class:`DataQualityError` on any anomaly, gaps and duplicates included."""


@dataclass(frozen=True)
class InputFile:
    """One file that was read."""

    path: str
    sha256: str
    rows: int
    had_header: bool


@dataclass(frozen=True)
class QualityReport:
    """Data-quality counts of the input, after de-duplication and before the policy."""

    rows: int
    """Rows read from all files (duplicates included)."""
    duplicates: int
    """Rows removed because another row had the same open_time."""
    gaps: int
    """Places where at least one whole bar is missing."""
    missing_bars: int
    """Whole bars missing across all gaps."""
    off_grid: int
    """Bars whose open_time is not on the interval grid."""
    irregular_close: int
    """Bars whose close_time is not ``open_time + interval - 1``."""
    zero_volume: int
    """Bars with zero volume."""
    dropped: int
    """Bars removed by the policy."""
    kept: int
    """Rows in the returned frame."""
    first_open_time: int | None
    last_open_time: int | None

    @property
    def anomalies(self) -> int:
        return self.off_grid + self.irregular_close + self.zero_volume

    def summary(self) -> str:
        return (
            f"{self.rows} rows, {self.duplicates} duplicates, {self.gaps} gaps "
            f"({self.missing_bars} missing bars), {self.off_grid} off-grid, "
            f"{self.irregular_close} irregular close_time, {self.zero_volume} zero-volume, "
            f"{self.dropped} dropped, {self.kept} kept"
        )


@dataclass(frozen=True)
class Klines:
    """Loaded candles with where they came from and what was wrong with them."""

    frame: pl.DataFrame
    """Columns :data:`FRAME_COLUMNS`: times Int64 epoch ms UTC, trades Int64, the rest Float64."""
    report: QualityReport
    files: tuple[InputFile, ...]
    symbol: str
    interval: str


def interval_ms(interval: str) -> int:
    """Length of a Binance interval name in milliseconds."""
    try:
        return INTERVAL_MS[interval]
    except KeyError:
        raise DataError(
            f"unsupported interval {interval!r}; use one of {', '.join(INTERVAL_MS)}"
        ) from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checksum_path(zip_path: Path) -> Path:
    return zip_path.with_name(zip_path.name + ".CHECKSUM")


def verify_checksum(zip_path: Path, actual_sha256: str | None = None) -> bool:
    """Check ``zip_path`` against its ``.CHECKSUM``; False when there is no CHECKSUM file.

    The CHECKSUM holds ``<sha256>  <zip name>`` (no trailing newline). Raises
    :class:`ChecksumError` naming the file on a mismatch or a malformed CHECKSUM.
    """
    cpath = checksum_path(zip_path)
    if not cpath.exists():
        return False
    fields = cpath.read_text().split()
    if len(fields) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
        raise ChecksumError(f"{cpath}: malformed CHECKSUM file (want '<sha256>  <name>')")
    expected, named = fields[0].lower(), fields[1]
    if named != zip_path.name:
        raise ChecksumError(f"{cpath}: names {named!r}, not {zip_path.name!r}")
    actual = actual_sha256 or sha256_file(zip_path)
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for {zip_path}: CHECKSUM says {expected}, file is {actual}"
        )
    return True


def _csv_bytes(path: Path, raw: bytes) -> bytes:
    """The CSV inside a zip (its only member, ideally ``<stem>.csv``) or the file itself."""
    if path.suffix.lower() != ".zip":
        return raw
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            wanted = f"{path.stem}.csv"
            member = wanted if wanted in names else (names[0] if len(names) == 1 else None)
            if member is None:
                raise DataError(f"{path}: expected one CSV member, found {names}")
            return archive.read(member)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not a valid zip archive ({exc})") from exc


def _has_header(csv: bytes) -> bool:
    first = csv.split(b"\n", 1)[0].split(b",", 1)[0].strip()
    return not first.isdigit()


def read_kline_file(path: Path) -> tuple[pl.DataFrame, InputFile]:
    """Read one kline file (zip or csv) into the raw 12-column frame, times not yet normalised."""
    raw = path.read_bytes()
    digest = sha256_bytes(raw)
    if path.suffix.lower() == ".zip":
        verify_checksum(path, digest)
    csv = _csv_bytes(path, raw)
    header = bool(csv.strip()) and _has_header(csv)
    if not csv.strip() or (header and b"\n" not in csv.strip()):
        frame = pl.DataFrame(schema=_SCHEMA)
    else:
        try:
            frame = pl.read_csv(
                io.BytesIO(csv), has_header=False, skip_rows=int(header), schema=_SCHEMA
            )
        except (pl.exceptions.PolarsError, ValueError) as exc:
            raise DataError(f"{path}: not a 12-column Binance kline CSV ({exc})") from exc
    return frame, InputFile(str(path), digest, frame.height, header)


def kline_files(paths: Path | str | Iterable[Path | str]) -> list[Path]:
    """Expand files and directories (their ``*.zip`` and ``*.csv``, sorted) into file paths."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files.extend(p for p in sorted(item.iterdir()) if p.suffix.lower() in {".zip", ".csv"})
        elif item.exists():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not files:
        raise DataError(f"no .zip or .csv kline files in {', '.join(map(str, items))}")
    return files


def _names(files: Sequence[Path]) -> tuple[str, str | None]:
    """Symbol and interval from Binance file names (``SYM-1h-2024-01.zip``), if consistent."""
    matches = [_NAME_RE.match(p.name.split(".")[0]) for p in files]
    symbols = {m["symbol"] for m in matches if m}
    intervals = {m["interval"] for m in matches if m}
    if len(symbols) > 1 or len(intervals) > 1:
        raise DataError(
            f"files mix symbols {sorted(symbols)} or intervals {sorted(intervals)}; load one series"
        )
    return (symbols.pop() if symbols else ""), (intervals.pop() if intervals else None)


def _to_ms(col: str) -> pl.Expr:
    t = pl.col(col)
    return pl.when(t >= MICROS_THRESHOLD).then(t // 1000).otherwise(t).alias(col)


def _infer_interval(open_time: pl.Series) -> str:
    diffs = open_time.diff().drop_nulls()
    diffs = diffs.filter(diffs > 0)
    if diffs.is_empty():
        raise DataError("cannot infer the interval from fewer than two bars; pass interval=")
    step = int(diffs.mode().min())  # type: ignore[arg-type]
    for name, ms in INTERVAL_MS.items():
        if ms == step:
            return name
    raise DataError(f"bars are {step} ms apart, which is no Binance interval; pass interval=")


def load_klines(
    paths: Path | str | Iterable[Path | str],
    *,
    interval: str | None = None,
    policy: AnomalyPolicy | str = AnomalyPolicy.DROP,
) -> Klines:
    """Load kline files (or directories of them) into one clean, time-ordered frame.

    ``interval`` defaults to the one in the file names, else the most common bar spacing.
    """
    policy = AnomalyPolicy(policy)
    files = kline_files(paths)
    symbol, named_interval = _names(files)
    frames, inputs = [], []
    for path in files:
        frame, info = read_kline_file(path)
        frames.append(frame)
        inputs.append(info)
    rows = sum(info.rows for info in inputs)
    frame = (
        pl.concat(frames)
        .lazy()
        .with_columns(_to_ms("open_time"), _to_ms("close_time"))
        .sort("open_time", maintain_order=True)
        .unique(subset="open_time", keep="first", maintain_order=True)
        .drop("ignore")
        .collect()
    )
    interval = interval or named_interval or _infer_interval(frame["open_time"])
    step = interval_ms(interval)
    offset = _GRID_OFFSET_MS.get(interval, 0)

    flagged = frame.with_columns(
        ((pl.col("open_time") - offset) % step != 0).alias("_off_grid"),
        (pl.col("close_time") != pl.col("open_time") + step - 1).alias("_irregular_close"),
        (pl.col("volume") == 0).alias("_zero_volume"),
        ((pl.col("open_time").diff() // step) - 1).clip(lower_bound=0).alias("_missing"),
    )
    anomalous = pl.col("_off_grid") | pl.col("_irregular_close") | pl.col("_zero_volume")
    counts = flagged.select(
        pl.col("_off_grid").sum(),
        pl.col("_irregular_close").sum(),
        pl.col("_zero_volume").sum(),
        (pl.col("_missing") > 0).sum().alias("gaps"),
        pl.col("_missing").sum(),
        anomalous.sum().alias("anomalous"),
    ).row(0, named=True)

    kept = flagged.filter(~anomalous) if policy is AnomalyPolicy.DROP else flagged
    kept = kept.select(FRAME_COLUMNS)
    report = QualityReport(
        rows=rows,
        duplicates=rows - frame.height,
        gaps=int(counts["gaps"] or 0),
        missing_bars=int(counts["_missing"] or 0),
        off_grid=int(counts["_off_grid"] or 0),
        irregular_close=int(counts["_irregular_close"] or 0),
        zero_volume=int(counts["_zero_volume"] or 0),
        dropped=frame.height - kept.height,
        kept=kept.height,
        first_open_time=kept["open_time"].min() if kept.height else None,  # type: ignore[arg-type]
        last_open_time=kept["open_time"].max() if kept.height else None,  # type: ignore[arg-type]
    )
    if policy is AnomalyPolicy.FAIL and (report.anomalies or report.gaps or report.duplicates):
        raise DataQualityError(f"data-quality policy 'fail': {report.summary()}")
    return Klines(kept, report, tuple(inputs), symbol, interval)
