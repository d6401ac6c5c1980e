"""Command line: ``python -m training {generate,data,train}``.

* ``generate --out data/default`` writes the deterministic offline dataset.
* ``data --symbol BTCUSDT --interval 1h --start 2024-01 --end 2024-12`` downloads Binance Vision
  monthly zips and their CHECKSUMs.
* ``train --data DIR --models-dir models`` trains the default set (model_1..model_4).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from training.config import ConfigError, load_config, parse_override
from training.klines import DataError


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
        metas = train_models(config, args.only or None, Path(config.models_dir))
    except (TrainingError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for meta in metas:
        valid = meta.metrics["validation"]
        test = meta.metrics.get("test", {})
        print(
            f"{meta.name}: {meta.model_type} v{meta.version} horizon={meta.horizon} "
            f"samples={meta.training_samples} best_iteration={meta.metrics['best_iteration']} "
            f"valid AUC={_fmt(valid['model']['auc'])} "
            f"test AUC={_fmt(test.get('model', {}).get('auc'))} "
            f"(previous-return baseline {_fmt(test.get('previous_return', {}).get('auc'))})"
        )
    return 0


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
