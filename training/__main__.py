"""Command line: ``python -m training {generate,data,train}``.

* ``generate --out data/default`` writes the deterministic offline dataset.
* ``data --symbol BTCUSDT --interval 1h --start 2024-01 --end 2024-12`` downloads Binance Vision
  monthly zips and their CHECKSUMs.
* ``train --data DIR --models-dir models`` trains the default set (model_1..model_4) and prints,
  per model and on the test period: AUC, accuracy, precision, recall, the signal thresholds, the
  BUY / SELL / HOLD mix and the hit rate and mean net return of BUY and SELL against the base
  rate, and the top features by importance.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from training.config import ConfigError, load_config, parse_override
from training.klines import DataError
from training.metadata import ModelMetadata


def _generate(args: argparse.Namespace) -> int:
    from training.generator import generate

    cfg = load_config(args.config)
    paths = generate(
        Path(args.out),
        symbol=args.symbol or cfg.symbol,
        interval=args.interval or "1h",
        start=args.start or cfg.generate_start,
        end=args.end or cfg.generate_end,
        seed=cfg.generate_seed if args.seed is None else args.seed,
        market=args.market,
    )
    print(f"wrote {len(paths)} monthly files to {args.out}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from training.download import DownloadError, download_klines

    try:
        paths = download_klines(
            args.symbol,
            args.interval,
            args.start,
            args.end,
            Path(args.out or f"data/{args.symbol}-{args.interval}"),
            base_url=args.base_url,
            market=args.market,
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(paths)} monthly files verified in {paths[0].parent if paths else args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from training.pipeline import TrainingError, train_models

    overrides = dict(parse_override(item) for item in args.set)
    for key in ("data", "models_dir", "train_start_date", "train_end_date", "horizon"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    try:
        config = load_config(args.config, overrides)
        scheduler = args.scheduler or os.environ.get("DASK_SCHEDULER") or None
        if args.cluster or scheduler:
            from training.dask_train import train_models_dask

            metas = train_models_dask(
                config, args.only or None, Path(config.models_dir), args.cluster, scheduler
            )
        else:
            metas = train_models(config, args.only or None, Path(config.models_dir))
    except (TrainingError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for meta in metas:
        print(model_summary(meta))
    return 0


def model_summary(meta: ModelMetadata) -> str:
    """What a training run says about one model: its classification metrics and signal on the
    test period (beside the base rates), the thresholds and the top features."""
    m = meta.metrics
    valid = m["validation"]["model"]
    test = m.get("test", {}).get("model", {})
    prev = m.get("test", {}).get("previous_return", {})
    t = meta.signal_thresholds
    lines = [
        f"{meta.name}: {meta.model_type} v{meta.version} horizon={meta.horizon} "
        f"fee={meta.fee:g} lookback={meta.lookback} features={len(meta.feature_names)} "
        f"samples={meta.training_samples} best_iteration={m['best_iteration']}",
        f"  test ({_count(test.get('samples'))} bars, up-rate {_pct(test.get('positive_rate'))}): "
        f"AUC {_fmt(test.get('auc'))} (validation {_fmt(valid['auc'])}, previous-return "
        f"baseline {_fmt(prev.get('auc'))}); at P(up) > 0.5: accuracy {_pct(test.get('accuracy'))} "
        f"precision {_pct(test.get('precision'))} recall {_pct(test.get('recall'))}",
    ]
    cal = m.get("calibration", {}).get("test", {})
    if meta.calibration and cal.get("samples"):
        lines.append(
            f"  calibration ({meta.calibration['method']} a={meta.calibration['a']:.4f} "
            f"b={meta.calibration['b']:+.4f}, fitted on validation), test: Brier "
            f"{cal['brier_raw']:.4f} -> {cal['brier_calibrated']:.4f}, ECE (10 bins) "
            f"{cal['ece_raw']:.4f} -> {cal['ece_calibrated']:.4f}"
        )
    if t:
        v = t.get("validation", {})
        lines.append(
            f"  thresholds ({t.get('rule')}, on validation, calibrated P(up)): "
            f"BUY at P(up) >= {t['buy']:.4f} "
            f"({_pct(v.get('buy_share'))} of bars, mean net {_bp(v.get('buy_mean_net_return'))}"
            f"{'' if v.get('buy_edge') else ', no edge'}), SELL at <= {t['sell']:.4f} "
            f"({_pct(v.get('sell_share'))}, mean net {_bp(v.get('sell_mean_net_return'))}"
            f"{'' if v.get('sell_edge') else ', no edge'})"
        )
    report = m.get("signals", {}).get("test", {})
    if report.get("samples"):
        share = report["share"]
        lines.append(
            f"  test signal mix: BUY {_pct(share['BUY'])}  SELL {_pct(share['SELL'])}  "
            f"HOLD {_pct(share['HOLD'])}"
        )
        for side, word in (("buy", "BUY (long)"), ("sell", "SELL (short)")):
            r = report[side]
            lines.append(
                f"  test {word}: {r['count']} bars, hit rate {_pct(r['hit_rate'])} vs base "
                f"{_pct(r['base_hit_rate'])}, mean net return {_bp(r['mean_net_return'])} vs "
                f"base {_bp(r['base_mean_net_return'])} (fee {meta.fee:g} included)"
            )
    top = m.get("top_features") or []
    if top:
        lines.append(
            "  top features (share of gain): "
            + ", ".join(f"{name} {share:.1%}" for name, share in top)
        )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _bp(value: float | None) -> str:
    """A log return in basis points."""
    return "n/a" if value is None else f"{value * 1e4:+.2f} bp"


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (default: training/default.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write the deterministic offline dataset")
    gen.add_argument("--out", default="data/default")
    gen.add_argument("--symbol")
    gen.add_argument("--interval")
    gen.add_argument("--start", help="first month, YYYY-MM")
    gen.add_argument("--end", help="last month, YYYY-MM")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--market", choices=["spot", "um"], default="spot")
    gen.set_defaults(func=_generate)

    data = sub.add_parser("data", help="download Binance Vision monthly klines")
    data.add_argument("--symbol", default="BTCUSDT")
    data.add_argument("--interval", default="1h")
    data.add_argument("--start", required=True, help="first month, YYYY-MM")
    data.add_argument("--end", required=True, help="last month, YYYY-MM")
    data.add_argument("--out", help="directory (default data/<SYMBOL>-<INTERVAL>)")
    data.add_argument("--market", choices=["spot", "um"], default="spot")
    data.add_argument(
        "--base-url", help="mirror of https://data.binance.vision (env XYLEN_BINANCE_VISION_URL)"
    )
    data.set_defaults(func=_download)

    train = sub.add_parser("train", help="train the model set")
    train.add_argument("--data", help="directory or file of kline zips/csvs")
    train.add_argument("--models-dir", dest="models_dir")
    train.add_argument("--only", action="append", default=[], help="model name (repeatable)")
    train.add_argument("--train-start-date", dest="train_start_date")
    train.add_argument("--train-end-date", dest="train_end_date")
    train.add_argument("--horizon", type=int)
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    train.add_argument(
        "--cluster",
        choices=["local"],
        help="train LightGBM/XGBoost on Dask: a LocalCluster of DASK_WORKERS (2) processes",
    )
    train.add_argument(
        "--scheduler", help="train on the Dask scheduler at this address (env DASK_SCHEDULER)"
    )
    train.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
