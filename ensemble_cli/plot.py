"""The PNG (or SVG, PDF ...) plot of ``ensemble simulate --plot``: one panel per member.

Nodes (requested size, nodes up) on the left axis, jobs (waiting, running) on a second axis on the
right, both with whole-number ticks; scale decisions marked at their target size; the recorded run,
when the simulation ran on a recorded trace, dashed in the same colours; the legend beside the panels,
not over the data; and the run's figures in the title.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ensemble_cli.runview import RunView, Series

COLORS = {"size": "#1f77b4", "up": "#2ca02c", "waiting": "#ff7f0e", "running": "#9467bd"}
LABELS = {"size": "requested size", "up": "nodes up", "waiting": "jobs waiting", "running": "jobs running"}


class PlotError(Exception):
    """The plot cannot be written: the message says why and what to do."""


def title_of(name: str, figures: dict[str, Any]) -> str:
    """The plot's title: the run's name and its main figures."""
    parts = []
    if "makespan_s" in figures:
        parts.append(f"makespan {figures['makespan_s']:.0f} s")
    if "node_seconds" in figures:
        parts.append(f"{figures['node_seconds']:.0f} node-s")
    if "utilization" in figures:
        parts.append(f"utilisation {100 * figures['utilization']:.0f}%")
    if "scale_events" in figures:
        parts.append(f"{figures['scale_events']} scale events")
    if "recorded_makespan_s" in figures:
        parts.append(f"recorded makespan {figures['recorded_makespan_s']:.0f} s")
    return name + ("\n" + ", ".join(parts) if parts else "")


def _steps(axis: Any, series: Series, key: str, dashed: bool, label: str | None) -> None:
    values: list[int] = getattr(series, key)
    if not values:
        return
    axis.step(
        series.t, values, where="post", color=COLORS[key], label=label,
        linestyle="--" if dashed else "-", linewidth=1.3 if dashed else 1.8, alpha=0.7 if dashed else 1.0,
    )  # fmt: skip


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # an optional extra: say how to get it
        raise PlotError("--plot needs matplotlib: pip install 'ensemble-operator[plot]'") from exc
    return plt


def draw(view: RunView, name: str) -> Any:
    """The figure of ``view`` (a matplotlib ``Figure``; close it with ``matplotlib.pyplot.close``). Raises
    :class:`PlotError` when matplotlib is missing."""
    plt = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    count = max(1, len(view.members))
    figure, axes = plt.subplots(count, 1, figsize=(11, 1.2 + 3.0 * count), squeeze=False, sharex=True)
    end = max([s.t[-1] for m in view.members for s in (m.series, m.recorded) if s is not None and s.t] + [1.0])
    for row, member in enumerate(view.members):
        nodes = axes[row][0]
        jobs = nodes.twinx()
        for key in ("size", "up"):
            _steps(nodes, member.series, key, False, LABELS[key] if row == 0 else None)
        for key in ("waiting", "running"):
            _steps(jobs, member.series, key, False, LABELS[key] if row == 0 else None)
        if member.recorded is not None:
            for key in ("size", "up"):
                _steps(nodes, member.recorded, key, True, f"recorded {LABELS[key]}")
            for key in ("waiting", "running"):
                _steps(jobs, member.recorded, key, True, f"recorded {LABELS[key]}")
        scales = [d for d in member.decisions if d.action == "scale" and d.size is not None]
        if scales:
            nodes.scatter([d.t for d in scales], [d.size for d in scales], marker="^", color="black", zorder=5,
                          s=24, label="scale decision" if row == 0 else None)  # fmt: skip
        nodes.set_ylabel(f"member {member.index}: nodes")
        jobs.set_ylabel("jobs")
        for axis in (nodes, jobs):
            axis.yaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_ylim(bottom=0)
        nodes.grid(True, alpha=0.3)
        nodes.set_xlim(0, end)
    axes[-1][0].set_xlabel("seconds since the run started" + (" (virtual)" if "simulation" in view.source else ""))
    handles, labels = [], []
    for axis in figure.axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.suptitle(title_of(name, view.figures), fontsize=11)
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize="small", frameon=False)
    figure.tight_layout(rect=(0, 0, 0.80, 1))
    return figure


def plot(view: RunView, path: str, name: str) -> None:
    """Draw ``view`` into ``path`` (the format from its suffix). Raises :class:`PlotError` when matplotlib is
    missing, the format is not one matplotlib writes, or the file cannot be written."""
    plt = _matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(path).suffix.lower().lstrip(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix not in supported:
        raise PlotError(
            f"--plot {path}: {'no file type' if not suffix else repr('.' + suffix)} is not an image format "
            f"matplotlib writes; end the name with one of {', '.join('.' + s for s in sorted(supported))}"
        )
    figure = draw(view, name)
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        raise PlotError(f"--plot {path}: cannot write the plot: {exc.strerror or exc}") from exc
    except ValueError as exc:  # matplotlib's word for a format it cannot write
        raise PlotError(f"--plot {path}: {exc}") from exc
    finally:
        plt.close(figure)
