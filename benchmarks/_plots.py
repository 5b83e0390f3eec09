"""The benchmarks' PNG charts, rendered headless with matplotlib (the ``bench`` dependency group).

matplotlib is not in the default (dev) environment, so a chart is optional: without it the
functions here say so on stderr and return None, and the scripts still write their JSON.
``uv run --group bench python benchmarks/<script>.py`` installs it on the fly.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["AdaptationSeries", "have_matplotlib", "plot_adaptation", "plot_utilisation"]

_BROKER_COLOUR = "tab:blue"
_PEER_COLOUR = "tab:orange"
_SCENARIO_ORDER = ("burst2", "burst1", "over25", "halving")
_REPO = Path(__file__).resolve().parent.parent


def have_matplotlib() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    # No display on a server or in CI: render straight to files.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _missing(path: Path) -> None:
    print(
        f"note: matplotlib is not installed, so {path.name} was not drawn; run with "
        "`uv run --group bench python benchmarks/...` to draw it",
        file=sys.stderr,
    )


def _save(figure: Figure, path: Path) -> str:
    """Write the PNG; return its path, relative to the repository when inside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    resolved = path.resolve()
    return str(resolved.relative_to(_REPO)) if resolved.is_relative_to(_REPO) else str(path)


# -- utilisation ----------------------------------------------------------------------------------


def _lost_pct(client: Mapping[str, Any]) -> float:
    if "run" in client:
        return float(client["run"]["lost_pct"])
    statuses = client.get("items_by_status", {})
    total = sum(statuses.values())
    return 100.0 * statuses.get("failed", 0) / total if total else 0.0


def plot_utilisation(
    scenarios: Mapping[str, Mapping[str, Any]],
    sweep: Mapping[str, Mapping[str, Any]],
    path: Path,
) -> str | None:
    """Bars of U, 429 share and ASINs lost, broker beside peer, per scenario and sweep step."""
    if not have_matplotlib():
        _missing(path)
        return None
    plt = _pyplot()
    labels: list[str] = []
    sides: list[tuple[Mapping[str, Any], Mapping[str, Any] | None]] = []
    # The scripts' order, also when the dicts come back from a JSON file with sorted keys.
    known = {name: number for number, name in enumerate(_SCENARIO_ORDER)}
    ordered = sorted(scenarios.items(), key=lambda item: known.get(item[0], len(known)))
    for name, result in ordered:
        peer = result.get("peer")
        if "after_halving" in result:
            # The window that matters for a halving is the one after the drop.
            labels.append(f"{name}\n(after drop)")
            broker_view = {**result, "window": result["after_halving"]}
            peer_view = {**peer, "window": peer["after_halving"]} if peer else None
            sides.append((broker_view, peer_view))
        else:
            labels.append(f"{name}\nB={result['server_burst']}")
            sides.append((result, peer))
    for keys, result in sorted(sweep.items(), key=lambda item: int(item[0])):
        labels.append(f"{keys} key{'s' if keys != '1' else ''}\nB={result['server_burst']}")
        sides.append((result, result.get("peer")))
    panels = (
        ("granted / allowed, %", lambda s: float(s["window"]["utilisation_pct"])),
        ("429 share of sends, %", lambda s: float(s["window"]["share_429_pct"])),
        ("ASINs lost, %", lambda s: _lost_pct(s["client"])),
    )
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.38
    positions = range(len(labels))
    for ax, (title, value) in zip(axes, panels, strict=True):
        ours = [value(b) for b, _ in sides]
        bars = ax.bar(
            [x - width / 2 for x in positions],
            ours,
            width,
            label="asin-broker",
            color=_BROKER_COLOUR,
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        if any(p is not None for _, p in sides):
            theirs = [value(p) if p is not None else 0.0 for _, p in sides]
            bars = ax.bar(
                [x + width / 2 for x in positions],
                theirs,
                width,
                label="python-amazon-paapi 7.1.0 (async)",
                color=_PEER_COLOUR,
            )
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        ax.set_title(title)
        # Never below 0, and a visible scale when every bar is 0 (no ASIN lost).
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
        ax.set_xticks(list(positions), labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 115)
    axes[0].axhline(100, color="grey", linewidth=0.8, linestyle=":")
    axes[0].legend(loc="lower left", fontsize=8)
    figure.suptitle("Utilisation against a rate-limited simulator (server-side counts)")
    figure.tight_layout()
    saved = _save(figure, path)
    plt.close(figure)
    return saved


# -- adaptation -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdaptationSeries:
    """What one client's panel shows: per key, per 1 s bin, sends and 429s; and its own rate.

    Attributes:
        title: the panel's heading.
        bins: the left edge of every bin, seconds since the run started.
        sent: per key, requests that arrived at the server in each bin (accepted + throttled).
        throttled: per key, 429s in each bin.
        own_rate: per key, (time, rate) samples of the client's own idea of its rate, if any.
    """

    title: str
    bins: Sequence[float]
    sent: Mapping[str, Sequence[int]]
    throttled: Mapping[str, Sequence[int]]
    own_rate: Mapping[str, Sequence[tuple[float, float]]] = field(default_factory=dict)


def _rolling(values: Sequence[int], width: int) -> list[float]:
    """The trailing mean over ``width`` bins (fewer at the start)."""
    out: list[float] = []
    total = 0
    for index, value in enumerate(values):
        total += value
        if index >= width:
            total -= values[index - width]
        out.append(total / min(index + 1, width))
    return out


def _adaptation_panel(
    ax: Axes, series: AdaptationSeries, true_rate: Sequence[tuple[float, float]], colour: str
) -> None:
    shades = ("-", "--", "-.", ":")
    # The true rate underneath, so the clients' lines stay visible where they match it.
    times = [t for t, _ in true_rate]
    rates = [r for _, r in true_rate]
    ax.step(
        times,
        rates,
        where="post",
        color="0.55",
        linewidth=4,
        alpha=0.5,
        zorder=1,
        label="true rate per key",
    )
    total_429 = [sum(col) for col in zip(*series.throttled.values(), strict=True)]
    ax.bar(
        series.bins,
        total_429,
        width=0.9,
        align="edge",
        color="tab:red",
        alpha=0.45,
        zorder=2,
        label="429s per second (all keys)",
    )
    # Whole requests per 1 s bin jump between neighbours (2, 3, 2 ... for 2.5/s): the bins
    # are drawn faint at their middles, a trailing 5 s mean bold on top.
    ends = [t + 1.0 for t in series.bins]
    for number, (key, sent) in enumerate(series.sent.items()):
        style = shades[number % len(shades)]
        ax.plot(
            [t + 0.5 for t in series.bins],
            sent,
            linestyle=style,
            color=colour,
            linewidth=0.7,
            alpha=0.35,
            zorder=3,
        )
        ax.plot(
            ends,
            _rolling(sent, 5),
            linestyle=style,
            color=colour,
            linewidth=1.8,
            zorder=4,
            label=f"{key} sends/s at the server (5 s mean; faint: 1 s bins)",
        )
    for number, (key, points) in enumerate(series.own_rate.items()):
        if points:
            ax.plot(
                [t for t, _ in points],
                [r for _, r in points],
                color="tab:green",
                linewidth=1.0,
                linestyle=shades[number % len(shades)],
                zorder=5,
                label=f"{key}: the broker's own rate",
            )
    ax.set_title(series.title)
    ax.set_ylabel("requests per second")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=7, ncol=2)


def plot_adaptation(
    panels: Sequence[AdaptationSeries],
    true_rate: Sequence[tuple[float, float]],
    path: Path,
    *,
    subtitle: str = "",
) -> str | None:
    """One panel per client: each key's send rate, the server's true rate, and the 429s."""
    if not have_matplotlib():
        _missing(path)
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), sharex=True)
    axes_list = list(axes) if len(panels) > 1 else [axes]
    peak = max((r for _, r in true_rate), default=1.0)
    for number, (ax, series) in enumerate(zip(axes_list, panels, strict=True)):
        colour = _BROKER_COLOUR if number == 0 else _PEER_COLOUR
        _adaptation_panel(ax, series, true_rate, colour)
        ax.set_ylim(0, peak * 2.0)
    axes_list[-1].set_xlabel("seconds")
    figure.suptitle("Adaptation to a server rate that steps down and back up" + subtitle)
    figure.tight_layout()
    saved = _save(figure, path)
    plt.close(figure)
    return saved
