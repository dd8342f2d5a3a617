"""A sweep's summary on its parent run: `sweep.md`, `sweep.png`, the best child
(docs/sweeps-seed-statistics.md). Plain Python: the tracking worker, a script, imports it."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

# Objectives where lower is better; every other metric is maximised.
LOWER_IS_BETTER = ("time_to_target_s", "epochs_to_target", "samples_to_target", "train_time_s", "val/loss")
# Params that differ between a sweep's jobs without making them different settings (nor run names).
NOT_A_SETTING = ("seed", "progress", "threads", "cuda_graph")
# What the per-setting table aggregates over seeds, besides the objective (*_to_target: seeds that reached it).
SEED_METRICS = ("test/exact_match", "test/token_acc", "test/prefix_acc", "time_to_target_s", "epochs_to_target")
REACHED = "epochs_to_target"  # a run has it when its val/exact_match reached its `target`
# Tags of a child that continues another child of its sweep: resumed from its checkpoint, or run again in its place.
CONTINUES = ("echo.resumed_from", "echo.rerun_of")
# Params that differ between a sweep's jobs without the sweep varying them: a resumed run's `resume`.
NOT_SWEPT = ("resume",)


def children(client, parent_run_id: str) -> list:
    """The sweep's child runs, less those another child continued (a job counts as its last run)."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000
    )
    continued = {run.data.tags.get(tag) for run in runs for tag in CONTINUES}
    return [run for run in runs if run.info.run_id not in continued]


def summarize_sweep(
    client, parent_run_id: str, objective: str = "val/exact_match", ignored: Iterable[str] = NOT_A_SETTING
) -> dict[str, object]:
    """Write the sweep's table, plot and best child onto its parent run; return the summary. Children
    that differ only in the `ignored` params are one setting."""
    runs = children(client, parent_run_id)
    lower = objective in LOWER_IS_BETTER
    worst = math.inf if lower else -math.inf
    runs.sort(key=lambda r: (r.data.metrics.get(objective, worst) * (1 if lower else -1), r.info.run_name))
    names = set().union(*(run.data.params for run in runs)) - set(NOT_SWEPT)
    swept = sorted(k for k in names if len({run.data.params.get(k) for run in runs}) > 1)  # what the sweep varied
    keys = [k for k in swept if k not in ignored]
    settings = seed_statistics(runs, keys, objective)
    client.log_text(parent_run_id, sweep_table(runs, swept, objective, settings, keys), "sweep.md")
    summary: dict[str, object] = {"children": len(runs), "swept": swept, "settings": [s.as_dict() for s in settings]}
    summary["failed"] = sum(run.info.status == "FAILED" for run in runs)
    scored = [r for r in runs if objective in r.data.metrics]
    if scored:
        best = scored[0]
        summary.update(best_run=best.info.run_name, best_run_id=best.info.run_id, best=best.data.metrics[objective])
        client.set_tag(parent_run_id, "echo.best_run", best.info.run_name)
        client.set_tag(parent_run_id, "echo.best_run_id", best.info.run_id)
        client.log_metric(parent_run_id, f"best/{objective}", best.data.metrics[objective])
        for key in swept:
            client.set_tag(parent_run_id, f"echo.best.{key}", best.data.params.get(key, ""))
    if len(settings) == 1 and settings[0].finished:  # a seeds-only sweep: its statistics on the parent
        for name, spread in settings[0].stats.items():
            client.log_metric(parent_run_id, f"mean/{name}", spread.mean)
            client.log_metric(parent_run_id, f"max/{name}", max(spread.values))
            if spread.std is not None:  # two seeds or more
                client.log_metric(parent_run_id, f"std/{name}", spread.std)
        client.log_metric(parent_run_id, "success_rate", settings[0].success_rate)
    if sum(len(s.stats.get(objective, ())) for s in settings) > 1:
        client.log_figure(parent_run_id, sweep_plot(settings, keys, objective), "sweep.png")
    return summary


@dataclass
class Spread:
    """A metric over a setting's finished seeds."""

    values: list[float]

    def __len__(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def cell(self, fmt: str) -> str:
        """`mean ± std (min–max)`; one seed: its value."""
        if len(self.values) == 1:
            return format(self.values[0], fmt)
        lo, hi = min(self.values), max(self.values)
        return f"{self.mean:{fmt}} ± {self.std:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


def spread(values: Iterable[float], fmt: str) -> str:
    """A metric's cell over seeds (also in experiments/report.py's tables); `–` for none."""
    values = list(values)
    return Spread(values).cell(fmt) if values else "–"


@dataclass
class Setting:
    """The children of a sweep that differ only in their seed."""

    values: dict[str, str]  # the swept params that make this setting (seed excluded)
    finished: list = field(default_factory=list)  # FINISHED children: the ones the statistics use
    unfinished: list = field(default_factory=list)  # FAILED, KILLED (or still RUNNING): counted, not averaged
    stats: dict[str, Spread] = field(default_factory=dict)  # metric -> its spread over finished seeds

    @property
    def reached(self) -> int:
        return sum(REACHED in run.data.metrics for run in self.finished)

    @property
    def success_rate(self) -> float | None:
        return self.reached / len(self.finished) if self.finished else None

    def as_dict(self) -> dict[str, object]:
        return {
            "setting": dict(self.values),
            "seeds": [run.data.params.get("seed", "") for run in sorted(self.finished, key=_seed)],
            "not_finished": len(self.unfinished),
            "reached": self.reached,
            "success_rate": self.success_rate,
            "stats": {
                name: {"n": len(s), "mean": s.mean, "std": s.std, "min": min(s.values), "max": max(s.values)}
                for name, s in self.stats.items()
            },
        }


def seed_statistics(runs: list, keys: list[str], objective: str) -> list[Setting]:
    """Children grouped by the params in `keys`, with their spreads over finished seeds; best setting first."""
    settings: dict[tuple, Setting] = {}
    for run in runs:
        values = {k: run.data.params.get(k, "") for k in keys}
        setting = settings.setdefault(tuple(values.values()), Setting(values))
        (setting.finished if run.info.status == "FINISHED" else setting.unfinished).append(run)
    metrics = list(dict.fromkeys([objective, *SEED_METRICS]))
    for setting in settings.values():
        for name in metrics:
            values = [run.data.metrics.get(name, math.nan) for run in setting.finished]
            values = [v for v in values if math.isfinite(v)]
            if values:
                setting.stats[name] = Spread(values)
    lower = objective in LOWER_IS_BETTER
    to_target = "_to_target" in objective  # only seeds that reached the target have it: rank by success first

    def rank(setting: Setting) -> tuple:
        spread = setting.stats.get(objective)
        order = [sortable(v) for v in setting.values.values()]
        if spread is None:
            return (1, 0.0, 0.0, order)
        success = -(setting.success_rate or 0.0) if to_target else 0.0
        return (0, success, spread.mean * (1 if lower else -1), order)

    return sorted(settings.values(), key=rank)


def sortable(value: str) -> tuple:
    """A param's text as a sort key: numbers by value, before text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _fmt(metric: str) -> str:
    if metric.endswith("_s"):
        return ".1f"
    if metric.startswith(("epochs", "samples")):
        return ".0f"
    if "exact_match" in metric or "acc" in metric:
        return ".3f"
    return ".4g"


def sweep_table(runs: list, swept: list[str], objective: str, settings: list[Setting], keys: list[str]) -> str:
    """`sweep.md`: a row per setting, then every child run, best first."""
    targets = sorted({run.data.params.get("target", "") for run in runs} - {""})
    target = f"`target`={targets[0]}" if len(targets) == 1 else "its run's `target`"
    metrics = [m for m in dict.fromkeys([objective, *SEED_METRICS]) if any(m in s.stats for s in settings)]
    best = f"max {objective}"  # the best seed, beside the mean (as Delétang et al. report)
    header = [*(keys or ["setting"]), "seeds", "not finished", "success", *metrics, best]
    lines = [
        "# Sweep summary",
        "",
        "## Per setting",
        "",
        "Children that differ only in `seed` are one setting. Each cell is mean ± std (min–max) over the "
        "setting's finished seeds; std is the sample standard deviation (n−1); a single seed shows its value. "
        f"`success`: finished seeds whose val/exact_match reached {target} (they have epochs_to_target), "
        "of all finished seeds. `not finished`: FAILED or KILLED children, left out of every mean, std, "
        "min–max and success rate. time_to_target_s and epochs_to_target are over the seeds that reached "
        f"the target. `{best}`: the objective's best seed (the max of its min–max), as `max/<metric>` on a "
        "seeds-only sweep's parent.",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for setting in settings:
        seeds = ",".join(run.data.params.get("seed", "?") for run in sorted(setting.finished, key=_seed))
        rate = setting.success_rate
        unfinished = Counter(run.info.status for run in setting.unfinished)
        row = [
            *(setting.values.values() if keys else ["all runs"]),
            f"{len(setting.finished)} ({seeds})" if seeds else "0",
            ", ".join(f"{n} {status}" for status, n in sorted(unfinished.items())) or "0",
            f"{setting.reached}/{len(setting.finished)} ({rate:.2f})" if rate is not None else "–",
            *(setting.stats[m].cell(_fmt(m)) if m in setting.stats else "–" for m in metrics),
            format(max(setting.stats[objective].values), _fmt(objective)) if objective in setting.stats else "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Runs", "", runs_table(runs, swept, objective)]
    return "\n".join(lines)


def _seed(run) -> tuple:
    return sortable(run.data.params.get("seed", ""))


def runs_table(runs: list, swept: list[str], objective: str) -> str:
    """A Markdown table of a sweep's runs in the order given."""
    metrics = list(
        dict.fromkeys([objective, "val/exact_match", "test/exact_match", "time_to_target_s", "train_time_s"])
    )
    header = ["run", "status", *swept, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for run in runs:
        params = [run.data.params.get(k, "") for k in swept]
        values = [f"{run.data.metrics[m]:.4g}" if m in run.data.metrics else "" for m in metrics]
        lines.append("| " + " | ".join([run.info.run_name, run.info.status, *params, *values]) + " |")
    return "\n".join(lines) + "\n"


MEAN_STYLE = dict(fmt="_", ms=18, mew=2, color="C3", capsize=6)  # a setting's mean ± std in sweep.png


def sweep_plot(settings: list[Setting], keys: list[str], objective: str):
    """Per setting, a point per finished seed and the mean ± std, for the objective and test/exact_match."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in dict.fromkeys([objective, "test/exact_match"]) if any(m in s.stats for s in settings)]
    order = sorted(settings, key=lambda s: [sortable(v) for v in s.values.values()])
    numeric = len(keys) == 1 and all(sortable(s.values[keys[0]])[0] == 0 for s in order)  # one numeric param swept
    x = [float(s.values[keys[0]]) for s in order] if numeric else list(range(len(order)))
    spacing = (max(x) - min(x)) / (len(x) - 1) if len(x) > 1 else 1.0
    logx = numeric and min(x) > 0 and max(x) / min(x) > 50
    fig, axes = plt.subplots(1, len(shown), figsize=(max(4.5, 0.6 * len(order) + 2) * len(shown), 4), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        labelled = False
        for setting, at in zip(order, x):
            spread = setting.stats.get(metric)
            if spread is None:
                continue
            offsets = [(j - (len(spread) - 1) / 2) / len(spread) for j in range(len(spread))]  # within ±0.5
            xs = [at * 1.05**o if logx else at + (0.12 if numeric else 0.3) * spacing * o for o in offsets]
            label = None if labelled else "mean ± std"
            ax.errorbar([at], [spread.mean], yerr=[[spread.std or 0.0]], label=label, **MEAN_STYLE)
            ax.scatter(xs, spread.values, s=16, color="C0", alpha=0.7, zorder=3, label=None if labelled else "seeds")
            labelled = True
        if logx:
            ax.set_xscale("log")
        if numeric:
            ax.set_xlabel(keys[0])
            if len(x) <= 12:
                ax.set_xticks(x, [s.values[keys[0]] for s in order])
        else:
            labels = [", ".join(f"{k.split('.')[-1]}={v}" for k, v in s.values.items()) or "all runs" for s in order]
            ax.set_xticks(x, labels, rotation=30 if len(order) > 1 else 0, ha="right" if len(order) > 1 else "center")
            ax.set_xlim(-0.6, len(order) - 0.4)
        if "exact_match" in metric or "acc" in metric:
            ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    unfinished = sum(len(s.unfinished) for s in settings)
    seeds = sum(len(s.finished) for s in settings)
    note = f"; {unfinished} not finished, not shown" if unfinished else ""
    fig.suptitle(f"{len(order)} setting(s), {seeds} finished runs: seeds and mean ± std (n−1){note}")
    fig.tight_layout()
    return fig
