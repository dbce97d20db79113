"""Training budgets, optimizer steps and convergence, from metrics.json's `training` entries."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from fedcxr.report import fmt, paper
from fedcxr.report.document import Table
from fedcxr.report.tables import config_label, configs_with, ordered, task_label

POOLED = ("single_node", "centralized")
# The tail of fedcxr.convergence.Plateau.why that the table's caption states once.
_RULE_TAIL = re.compile(r" over the best before them \(tolerance [^)]*\)")
FEDERATED = ("federated", "federated_dp")


def training(configs: Mapping[str, Mapping[str, Any]], config: str, task: str) -> dict[str, Any]:
    """The `training` entry of `config` on `task` ({} when not recorded)."""
    entry = ((configs.get(config) or {}).get(task) or {}).get("training")
    return entry if isinstance(entry, dict) else {}


def recorded(configs: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether any configuration records its training (convergence, budget)."""
    return any(
        isinstance(m.get("training"), dict) for per in configs.values() for m in per.values()
    )


def not_converged(configs: Mapping[str, Mapping[str, Any]], task: str) -> list[str]:
    """Configurations whose `training.converged` is false on `task`, in report order."""
    return [
        c
        for c in configs_with(configs, task)
        if training(configs, c, task).get("converged") is False
    ]


def budgets(configs: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], int]:
    """(config, task) -> training budget in cumulative local epochs, where recorded."""
    out = {}
    for config in ordered(configs):
        for task, m in configs[config].items():
            epochs = fmt.number((m.get("training") or {}).get("epochs"))
            if epochs is not None:
                out[(config, task)] = int(epochs)
    return out


def budget_sentence(configs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """'Equal budgets: E epochs each ...' or which configurations' budgets differ."""
    found = budgets(configs)
    if not found:
        return None
    values = sorted(set(found.values()), reverse=True)
    unit = "cumulative local epochs: passes over each training image"
    if len(values) == 1:
        return f"Equal budgets: {values[0]} epochs each ({unit}), every configuration and task."
    groups = []
    for value in values:
        names = []
        for config in ordered({c for c, _ in found}):
            tasks = [t for (c, t), v in found.items() if c == config and v == value]
            all_tasks = [t for (c, t) in found if c == config]
            if tasks:
                names.append(
                    config_label(config)
                    if len(tasks) == len(all_tasks)
                    else f"{config_label(config)} ({', '.join(task_label(t) for t in tasks)})"
                )
        groups.append(f"{value} epochs for {', '.join(names)}")
    return (
        f"Budgets are not equal ({unit}): {'; '.join(groups)}. A comparison across different "
        f"budgets measures the budget as well as the method (as after "
        f"`dvc exp run -S fl.local_epochs=5`, which lengthens the federated runs only; "
        f"train.epochs sets the pooled ones)."
    )


def _site_train_sizes(partition: Mapping[str, Any] | None) -> dict[str, int]:
    sets = (partition or {}).get("sets") or {}
    out = {}
    for name, s in sets.items():
        n = fmt.number(((s or {}).get("train") or {}).get("images"))
        if name != "test" and n is not None:
            out[name] = int(n)
    return out


def _first_epochs(configs: Mapping[str, Mapping[str, Any]], wanted: tuple[str, ...]) -> int | None:
    for (config, _), epochs in budgets(configs).items():
        if config in wanted:
            return epochs
    return None


def steps_lines(
    configs: Mapping[str, Mapping[str, Any]],
    partition: Mapping[str, Any] | None,
    batch_size: int | None,
    rounds: int | None,
    local_epochs: int | None,
) -> list[str]:
    """How many optimizer steps each kind of run took: pooled E·⌈N/B⌉ on one model, federated
    R rounds of E_local·⌈n_k/B⌉ steps per site, the global model moving R times."""
    sizes = _site_train_sizes(partition)
    if not sizes:
        return []
    b = batch_size or paper.BATCH_SIZE
    b_text = f"B = {b}" + ("" if batch_size else " (assumed: the paper's batch size)")
    n = sum(sizes.values())
    lines = []
    pooled = [c for c in POOLED if any(k == c for k, _ in budgets(configs))]
    e = _first_epochs(configs, POOLED)
    if pooled and e is not None:
        per = math.ceil(n / b)
        lines.append(
            f"Pooled runs ({', '.join(config_label(c) for c in pooled)}): E·⌈N/B⌉ = {e} × "
            f"⌈{fmt.count(n)}/{b}⌉ = {fmt.count(e * per)} optimizer steps on one model "
            f"(N = {fmt.count(n)} training images of all sites, {b_text}; DDP splits each "
            f"batch across its ranks, so the count is the same)."
        )
    fed_epochs = _first_epochs(configs, FEDERATED)
    if fed_epochs is not None and rounds is None and local_epochs:
        rounds = fed_epochs // local_epochs
    if fed_epochs is not None and local_epochs is None and rounds:
        local_epochs = fed_epochs // rounds
    if fed_epochs is not None and rounds and local_epochs:
        per_site = ", ".join(
            f"{site} {fmt.count(local_epochs * math.ceil(k / b))}" for site, k in sizes.items()
        )
        lines.append(
            f"Federated runs: R = {rounds} rounds × E_local = {local_epochs} local epoch"
            f"{'' if local_epochs == 1 else 's'} ({fed_epochs} epochs of budget). Each round every "
            f"site takes E_local·⌈n_k/B⌉ steps on its own copy of the model ({per_site}) and "
            f"the global model moves {rounds} times, once per FedAvg round: one round of "
            f"E local epochs is not E pooled epochs."
        )
    return lines


def reach_line(configs: Mapping[str, Mapping[str, Any]], task: str) -> str | None:
    """The federated rounds to reach a share of the centralized validation AUROC."""
    t = training(configs, "federated", task)
    if "reach_share" not in t:
        return None
    share = fmt.number(t.get("reach_share"))
    target = fmt.number(t.get("reach_target_val_auroc"))
    rounds = fmt.number(t.get("rounds_to_reach"))
    share_text = f"{100 * share:.0f}%" if share is not None else "a share"
    head = (
        f"{task_label(task).capitalize()}: federated rounds to reach {share_text} of the "
        f"centralized model's final validation AUROC"
    )
    if target is None:
        return f"{head}: not computed (no centralized validation AUROC)."
    head += f" (target {target:.3f})"
    if rounds is None:
        return f"{head}: not reached within the budget (in at least one seed)."
    return f"{head}: {rounds:.1f} rounds (mean over seeds)."


def convergence_table(configs: Mapping[str, Mapping[str, Any]], task: str) -> Table | None:
    """Per configuration: budget, best and final validation AUROC, converged and why."""
    rows = []
    rule = None
    for config in configs_with(configs, task):
        t = training(configs, config, task)
        if not t:
            continue
        converged = {True: "yes", False: "no"}.get(t.get("converged"), fmt.MISSING)
        rows.append(
            (
                config_label(config),
                fmt.count(t.get("epochs")),
                fmt.num(t.get("best_val_auroc")),
                fmt.num(t.get("final_val_auroc")),
                converged,
                _RULE_TAIL.sub("", str(t.get("why") or fmt.MISSING)),
            )
        )
        if rule is None and t.get("plateau_window") is not None:
            rule = (t.get("plateau_window"), t.get("plateau_tol"))
    if not rows:
        return None
    caption = f"Convergence — {task_label(task)}: validation AUROC, mean over seeds"
    if rule is not None:
        caption += (
            f"; converged: the last {rule[0]} evaluations gained at most {rule[1]} over the "
            f"best before them, in every seed"
        )
    headers = (
        "Configuration",
        "Budget (epochs)",
        "Best val AUROC",
        "Final val AUROC",
        "Converged",
        "Why",
    )
    return Table(headers, tuple(rows), caption)
