"""A replay's strategies, figures and files (JSON, Markdown, equity-curve PNG).

Strategies from one pass's recorded decisions, each vote included, so a replay runs the stack
once per pass rather than once per strategy:

* ``<model> alone``: the model's own signal (its own thresholds, its own horizon);
* ``ensemble adaptive``: the coordinator's decision (adaptive weights, as it answered);
* ``ensemble static``: the same votes combined with the configured weights and the members'
  thresholds, by the coordinator's own arithmetic (:func:`xylen_coordinator.ensemble.combine`,
  :func:`~xylen_coordinator.ensemble.member_thresholds`);
* ``buy and hold``.

Each is computed for the learning pass (retraining on) and the frozen pass (no retraining).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backtest.accounting import bar_returns, buy_and_hold, equity, metrics, side_of
from backtest.replay import Decision, PassResult
from xylen_coordinator.config import Thresholds
from xylen_coordinator.ensemble import combine, member_thresholds

FALLBACK = Thresholds(buy=0.55, sell=0.45)


def static_signal(decision: Decision, members: Mapping[str, Mapping[str, Any]]) -> str:
    """The ensemble's signal on ``decision``'s votes with the configured weights."""
    weights = {
        name: (0.0 if vote["left_out"] else float(vote["configured_weight"]))
        for name, vote in decision.votes.items()
    }
    probabilities = {name: float(vote["p"]) for name, vote in decision.votes.items()}
    own = {}
    for name, vote in decision.votes.items():
        m = members[name]["versions"].get(vote["version"], members[name])
        own[name] = (float(m["buy"]), float(m["sell"]))
    thresholds = member_thresholds(weights, own, FALLBACK)
    return str(combine(probabilities, weights, thresholds).signal.value)


def strategy_sides(result: PassResult) -> dict[str, tuple[list[int], int, float]]:
    """Strategy name -> (side per decision, horizon, fee)."""
    members = result.members
    first = next(iter(members.values()))
    out: dict[str, tuple[list[int], int, float]] = {}
    for name, m in members.items():
        out[f"{name} alone"] = (
            [side_of(d.votes[name]["signal"]) for d in result.decisions],
            int(m["horizon"]),
            float(m["fee"]),
        )
    ensemble_h, ensemble_fee = int(first["horizon"]), float(first["fee"])
    out["ensemble static"] = (
        [side_of(static_signal(d, members)) for d in result.decisions],
        ensemble_h,
        ensemble_fee,
    )
    out["ensemble adaptive"] = (
        [side_of(d.signal) for d in result.decisions],
        ensemble_h,
        ensemble_fee,
    )
    return out


def build(
    passes: Sequence[PassResult],
    candles: Mapping[str, np.ndarray],
    bars: range,
    step_ms: int,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The report as one JSON-able dict; figures depend only on the data and the settings."""
    close = np.asarray(candles["close"], dtype=np.float64)
    open_time = np.asarray(candles["open_time"], dtype=np.int64)
    bars_per_year = 365.25 * 86_400_000 / step_ms
    horizons = [int(m["horizon"]) for p in passes for m in p.members.values()]
    last = bars[-1] + max(horizons)
    length = last - bars[0] + 1
    strategies: dict[str, Any] = {}
    curves: dict[str, list[float]] = {}
    fee = float(next(iter(passes[0].members.values()))["fee"])
    for result in passes:
        decided = [d.bar for d in result.decisions]
        for name, (sides, horizon, f) in strategy_sides(result).items():
            returns, trades = bar_returns(close, decided, sides, horizon, f)
            padded = np.zeros(length)
            padded[: len(returns)] = returns
            key = f"{name} ({result.name})"
            strategies[key] = metrics(padded, trades, horizon, bars_per_year).as_dict()
            strategies[key]["horizon"] = horizon
            gross, _ = bar_returns(close, decided, sides, horizon, 0.0)
            strategies[key]["return_before_fees"] = float(equity(gross)[-1] - 1.0)
            curves[key] = equity(padded).tolist()
    hold = buy_and_hold(close, bars[0], last, fee)
    strategies["buy and hold"] = metrics(
        hold, [float(equity(hold)[-1] - 1)], 1, bars_per_year
    ).as_dict()
    strategies["buy and hold"]["turnover"] = 2.0
    strategies["buy and hold"]["horizon"] = length - 1
    strategies["buy and hold"]["return_before_fees"] = float(close[last] / close[bars[0]] - 1.0)
    curves["buy and hold"] = equity(hold).tolist()
    return {
        "settings": dict(settings),
        "bars": {
            "decisions": len(bars),
            "first_open_time": int(open_time[bars[0]]),
            "last_open_time": int(open_time[bars[-1]]),
            "last_exit_open_time": int(open_time[last]),
            "interval_ms": step_ms,
            "bars_per_year": bars_per_year,
        },
        "strategies": strategies,
        "passes": {
            p.name: {
                "retrains": [{k: v for k, v in e.items() if k != "job_id"} for e in p.retrains],
                "swaps": p.swaps,
                "adaptive_at_end": p.adaptive,
                "decision_columns": ["open_time", "ensemble adaptive", "ensemble static"]
                + [f"{name} alone" for name in p.members],
                "decisions": [
                    [d.open_time, d.signal, static_signal(d, p.members)]
                    + [d.votes[name]["signal"] for name in p.members]
                    for d in p.decisions
                ],
                "signals": {
                    s: sum(1 for d in p.decisions if d.signal == s) for s in ("BUY", "SELL", "HOLD")
                },
            }
            for p in passes
        },
        "curves": curves,
    }


def timings(passes: Sequence[PassResult]) -> dict[str, Any]:
    """Wall-clock figures (not part of the deterministic report)."""
    return {
        p.name: {
            "bars": len(p.decisions),
            "bars_per_second": len(p.decisions) / (p.timings.total - p.timings.startup)
            if p.timings.total > p.timings.startup
            else 0.0,
            **{k: round(v, 3) for k, v in vars(p.timings).items()},
            "exit_codes": p.exit_codes,
            "cpu_seconds": p.cpu,
        }
        for p in passes
    }


def write(report: Mapping[str, Any], timing: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """report.json (figures), timings.json, report.md and equity.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "timings": out / "timings.json",
        "markdown": out / "report.md",
        "png": out / "equity.png",
    }
    paths["json"].write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    paths["timings"].write_text(json.dumps(timing, indent=1, sort_keys=True) + "\n")
    paths["markdown"].write_text(markdown(report, timing))
    plot(report, paths["png"])
    return paths


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def markdown(report: Mapping[str, Any], timing: Mapping[str, Any]) -> str:
    from training.split import iso_ms

    bars = report["bars"]
    lines = [
        "# Walk-forward replay",
        "",
        f"{bars['decisions']} decisions, bars {iso_ms(bars['first_open_time'])} .. "
        f"{iso_ms(bars['last_open_time'])} (exits to {iso_ms(bars['last_exit_open_time'])}), "
        f"interval {bars['interval_ms'] // 60000} min; data {report['settings'].get('data')}.",
        "Every decision is a trade at its bar's close (BUY long, SELL short, HOLD none), closed "
        "after the model's horizon at the real close, net of the round-trip fee "
        f"{report['settings'].get('fee')}; Sharpe from bar returns x sqrt(bars per year).",
        "",
        "| strategy | net return | Sharpe | max drawdown | hit rate | trades | turnover "
        "| return before fees |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["strategies"].items():
        lines.append(
            f"| {name} | {_pct(s['net_return'])} | {s['sharpe']:.2f} | "
            f"{100 * s['max_drawdown']:.2f}% | {100 * s['hit_rate']:.1f}% | {s['trades']} | "
            f"{s['turnover']:.0f}x | {_pct(s['return_before_fees'])} |"
        )
    for name, p in report["passes"].items():
        lines += ["", f"## Pass `{name}`", "", f"Ensemble signals: {p['signals']}.", ""]
        if p["retrains"]:
            lines += [
                "| bar | time | model | verdict | samples | holdout | log loss serving -> cand. "
                "| AUC serving -> cand. | version |",
                "|---:|---|---|---|---:|---:|---|---|---:|",
            ]
            for e in p["retrains"]:
                g = e["gate"]
                lines.append(
                    f"| {e['bar']} | {iso_ms(e['open_time'])} | {e['model']} | {e['state']} | "
                    f"{e['samples']} | {g['holdout_samples']} | {g['serving_log_loss']:.4f} -> "
                    f"{g['candidate_log_loss']:.4f} | {g['serving_auc']:.3f} -> "
                    f"{g['candidate_auc']:.3f} | {e['version']} |"
                )
        else:
            lines.append("No retrains.")
        if p["swaps"]:
            lines += [
                "",
                "Swaps: "
                + ", ".join(
                    f"{s['model']} v{s['from_version']}->v{s['to_version']} at bar {s['bar']}"
                    for s in p["swaps"]
                ),
            ]
    lines += ["", "## Speed (wall clock, this machine)", ""]
    for name, t in timing.items():
        lines.append(
            f"- `{name}`: {t['bars']} bars in {t['total']:.1f} s ({t['bars_per_second']:.1f} "
            f"bars/s after start-up): predict {t['predict']:.1f} s (inside the coordinator "
            f"{t['coordinator']:.1f} s, slowest server round trip {t['votes']:.1f} s), "
            f"feedback {t['feedback']:.1f} s, retrain checks {t['retrain_checks']:.1f} s, "
            f"retraining {t['retraining']:.1f} s, replay's own {t['local']:.1f} s, "
            f"start-up {t['startup']:.1f} s; CPU seconds over the bars: "
            + ", ".join(f"{k} {v:.1f}" for k, v in t.get("cpu_seconds", {}).items())
        )
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6.5), dpi=100)
    bases = list(dict.fromkeys(name.split(" (")[0] for name in report["curves"]))
    palette = plt.get_cmap("tab10")
    for name, curve in report["curves"].items():
        base = name.split(" (")[0]
        colour = "black" if base == "buy and hold" else palette(bases.index(base) % 10)
        style = "--" if name.endswith("(frozen)") else "-"
        width = 2.0 if "ensemble" in name or base == "buy and hold" else 0.9
        ax.plot(curve, style, color=colour, linewidth=width, label=name)
    first = report["bars"]["first_open_time"]
    step = report["bars"]["interval_ms"]
    marked = set()
    for p in report["passes"].values():
        for e in p["retrains"]:
            x = (e["open_time"] - first) // step
            colour = {"promoted": "green", "refused": "red"}.get(e["state"], "grey")
            label = f"retrain {e['state']}"
            ax.axvline(
                x,
                color=colour,
                alpha=0.35,
                linewidth=0.8,
                label=None if label in marked else label,
            )
            marked.add(label)
    ax.set_xlabel("bars since the first decision")
    ax.set_ylabel("equity (net of fees, start 1)")
    ax.set_title("Walk-forward replay through the stack")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
