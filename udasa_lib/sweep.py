"""Parameter sweeps: a YAML grid expanded into normal runs, then one summary table and plot.

    python -m udasa_lib.sweep configs/sweeps/sentiment_beta.yaml      (make sweep SWEEP=...)

Each grid point is the sweep's base config plus `set` plus one value per axis, run through the
stage named by `through` (and everything it reads) with the same papermill chain as
`make reproduce`; stages whose keys a point does not change are shared, not recomputed.
Results: results/sweeps/<sweep name>/summary.csv (every metric row of every point, with the
axis values as columns), points.json (point -> run folder) and frontier.png.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from udasa_lib import config as config_mod
from udasa_lib import metrics, pipeline
from udasa_lib.io import atomic_save_figure, atomic_write_json, atomic_write_text

SWEEP_KEYS = {"config", "through", "set", "grid", "plot"}


@dataclass(frozen=True)
class Sweep:
    name: str
    config: str
    through: str
    fixed: dict[str, Any]
    axes: dict[str, tuple[tuple[str, ...], tuple[Any, ...]]]  # axis -> (dotted keys, values)
    plot: dict[str, str]


def load_sweep(path: Path | str) -> Sweep:
    """Read and check a sweep file, then resolve every grid point's config.

    Raises ConfigError naming the sweep file and the key when the file is missing or not a
    mapping, a top-level key is unknown (e.g. misspelled) or missing, `set`/`grid`/`plot` or a grid
    axis is not a mapping, an axis's `keys` is not a list of dotted keys or its `values` not a
    non-empty list, or a point's overrides do not resolve (before the first run starts)."""
    path = Path(path)
    if not path.exists():
        raise config_mod.ConfigError(f"{path}: sweep file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise config_mod.ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise config_mod.ConfigError(f"{path}: top level must be a mapping of {', '.join(sorted(SWEEP_KEYS))}, "
                                     f"got a {type(raw).__name__}")
    unknown = sorted(set(raw) - SWEEP_KEYS, key=str)
    if unknown:
        raise config_mod.ConfigError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(SWEEP_KEYS))})")
    for key in ("config", "through", "grid"):
        if key not in raw:
            raise config_mod.ConfigError(f"{path}: missing key {key!r}")
    for key in ("set", "grid", "plot"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise config_mod.ConfigError(f"{path}: {key} must be a mapping, got a {type(raw[key]).__name__}")
    if raw["through"] not in pipeline.STAGES:
        raise config_mod.ConfigError(f"{path}: through: unknown stage {raw['through']!r}")
    axes = {}
    for axis, spec in (raw["grid"] or {}).items():
        if not isinstance(spec, dict) or set(spec) != {"keys", "values"}:
            raise config_mod.ConfigError(f"{path}: grid.{axis} needs `keys` (dotted config keys) and non-empty `values`")
        keys, values = spec["keys"], spec["values"]
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise config_mod.ConfigError(f"{path}: grid.{axis}.keys must be a non-empty list of dotted config keys, "
                                         f"got {keys!r}")
        if not isinstance(values, list) or not values:
            raise config_mod.ConfigError(f"{path}: grid.{axis}.values must be a non-empty list, got {values!r}")
        axes[axis] = (tuple(keys), tuple(values))
    if not axes:
        raise config_mod.ConfigError(f"{path}: grid has no axis")
    sweep = Sweep(path.stem, raw["config"], raw["through"], dict(raw.get("set") or {}), axes, dict(raw.get("plot") or {}))
    for point in points(sweep):  # fail on a bad key before the first run starts
        try:
            config_mod.resolve(pipeline._repo_path(sweep.config), point_overrides(sweep, point))
        except config_mod.ConfigError as error:
            raise config_mod.ConfigError(f"{path}: point {point}: {error}") from None
    return sweep


def points(sweep: Sweep) -> list[dict[str, Any]]:
    names = list(sweep.axes)
    return [dict(zip(names, values)) for values in itertools.product(*(sweep.axes[n][1] for n in names))]


def point_overrides(sweep: Sweep, point: dict[str, Any]) -> dict[str, Any]:
    overrides = dict(sweep.fixed)
    for axis, value in point.items():
        for key in sweep.axes[axis][0]:
            overrides[key] = value
    return overrides


def sweep_dir(sweep: Sweep) -> Path:
    return pipeline.results_root() / "sweeps" / sweep.name


def run_sweep(sweep: Sweep) -> Path:
    import pandas as pd

    frames, folders = [], []
    for index, point in enumerate(points(sweep), 1):
        print(f"[sweep {sweep.name}] point {index}/{len(points(sweep))}: {point}")
        runs = pipeline.run_through(sweep.through, sweep.config, point_overrides(sweep, point), f"sweep-{sweep.name}")
        target = next(r for r in runs if r.name == sweep.through)
        folders.append({**point, "run_dir": str(target.run_dir)})
        try:  # every evaluation the point ran, as in its run's results table
            frames.append(metrics.results_table(target.run_dir).assign(**point, run_dir=str(target.run_dir)))
        except FileNotFoundError:  # a sweep that stops before the evaluations has no metrics to collect
            pass
    out = sweep_dir(sweep)
    atomic_write_json(out / "points.json", folders)
    if frames:
        summary = pd.concat(frames, ignore_index=True)
        atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
        if sweep.plot:
            plot_frontier(summary, sweep, out / "frontier.png")
    return out


def plot_frontier(summary, sweep: Sweep, path: Path) -> Path:
    """y against x per method, one marker per grid point, 95 % CIs as error bars, points joined in
    the order of the first axis (e.g. increasing beta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, task = sweep.plot["x"], sweep.plot["y"], sweep.plot.get("task")
    axis = next(iter(sweep.axes))
    data = summary[summary.task == task] if task else summary
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, part in data.groupby("method", sort=False):
        wide = part.pivot_table(index=axis, columns="metric", values=["value", "ci_low", "ci_high"]).sort_index()
        if x not in wide["value"] or y not in wide["value"]:
            continue
        xv, yv = wide["value"][x], wide["value"][y]
        ax.errorbar(xv, yv, xerr=[xv - wide["ci_low"][x], wide["ci_high"][x] - xv],
                    yerr=[yv - wide["ci_low"][y], wide["ci_high"][y] - yv], marker="o", capsize=2, label=method)
        for value, px, py in zip(wide.index, xv, yv):
            ax.annotate(f"{axis}={value:g}" if isinstance(value, (int, float)) else str(value), (px, py),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"sweep {sweep.name}: {y} vs {x} (95 % CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udasa_lib.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="configs/sweeps/<name>.yaml")
    args = parser.parse_args(argv)
    try:
        out = run_sweep(load_sweep(args.sweep))
    except (config_mod.ConfigError, pipeline.StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"sweep results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
