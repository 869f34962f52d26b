"""Ray Tune over the train stage's own training: loss weights, learning rate, dropout; validation only.

Each trial is a function that builds a `TrainConfig` from the sampled values and runs the train stage's own
epoch loop (`erc.training.loop.train_runs`). A single-worker trial runs it in the trial's own process (a nested worker
group would cost seconds of start-up per trial and add nothing); a multi-worker trial starts a TorchTrainer
(`erc.training.driver.fit`) whose reports reach Tune through `TuneReportCallback`. Every epoch reaches Tune, so ASHA can
stop a poor trial after `grace_period` epochs while Optuna's TPE proposes the next. The objective is
validation weighted F1; no trial reads the test split.

MLflow: one parent run per search (search space, best config, plots), one nested run per trial (its sampled
values as params and its per-epoch validation metrics). Search spaces are params (`tune.space` in params.yaml):
keys are `train.<TrainConfig field>` or `model.<model Config field>`, values one distribution each:
`{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{randint: [lo, hi]}` (hi excluded) or `{choice: [a, b, ...]}`.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path

import yaml

from erc.errors import ErcDataError
from erc.io import atomic_path
from erc.models import MODELS
from erc.training.config import SELECT, TrainConfig

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
NOT_SEARCHED = {"protocol", "paper_entry", "paper_train_on_valid"}  # a search is erc's protocol, params' own settings
PARENT_FILE = "mlflow_parent_run.json"  # beside Tune's experiment state: a resumed search keeps its parent run


def space_for(params: dict, model: str, source="params.yaml") -> dict:
    """The search space of `model`: `tune.space.all` then `tune.space.<model>`, checked against the configs."""
    spaces = (params.get("tune") or {}).get("space") or {}
    space = {**(spaces.get("all") or {}), **(spaces.get(model) or {})}
    train_fields = {f.name for f in fields(TrainConfig)}
    model_fields = {f.name for f in fields(MODELS[model].Config)}
    for key, spec in space.items():
        section, _, name = key.partition(".")
        if not ((section == "train" and name in train_fields) or (section == "model" and name in model_fields)):
            raise ErcDataError(source, f"tune.space key {key!r} is neither train.<field> nor model.<{model} field>")
        if section == "train" and name in NOT_SEARCHED:
            raise ErcDataError(source, f"tune.space key {key!r}: a protocol setting, never searched")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ErcDataError(source, f"tune.space {key}: expected one of {DISTRIBUTIONS} with its arguments")
        kind, args = next(iter(spec.items()))
        if kind != "choice" and not (isinstance(args, list) and len(args) == 2 and args[0] < args[1]):
            raise ErcDataError(source, f"tune.space {key}: {kind} needs [low, high] with low < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ErcDataError(source, f"tune.space {key}: loguniform needs a positive low bound")
    return space


def to_tune(space: dict) -> dict:
    from ray import tune

    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint,
            "choice": lambda *options: tune.choice(list(options))}
    return {key: make[kind](*args) for key, spec in space.items() for kind, args in spec.items()}


def apply_sample(cfg: TrainConfig, sample: dict) -> TrainConfig:
    """`cfg` with the sampled `train.*` fields and `model.*` config keys replaced."""
    train = {k.split(".", 1)[1]: v for k, v in sample.items() if k.startswith("train.")}
    model = {k.split(".", 1)[1]: v for k, v in sample.items() if k.startswith("model.")}
    return replace(cfg, **train, model_config={**cfg.model_config, **model})


# ---------------------------------------------------------------- one trial (runs in a Tune trial actor)


def run_trial(sample: dict, *, base: dict, parent_run_id: str, storage: str) -> None:
    import mlflow
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from erc import tracking
    from erc.training.driver import fit
    from erc.training.loop import train_runs
    from erc.training.sessions import TuneSession

    trial = tune.get_context().get_trial_id()
    cfg = apply_sample(TrainConfig(**base), sample)
    cfg.storage_path = storage
    client = mlflow.MlflowClient(cfg.tracking_uri)
    run = client.create_run(tracking.experiment_id(cfg.experiment, cfg.tracking_uri), tags={
        "mlflow.parentRunId": parent_run_id, "mlflow.runName": f"trial {trial}", "role": "tune-trial",
        "tune_trial_id": trial, "model": cfg.model, "dataset": cfg.dataset, "seed": str(cfg.seed)})
    cfg.run_id = run.info.run_id
    tracking.log_params(client, cfg.run_id, {**sample, **{f"config.{k}": v for k, v in tracking.flatten(asdict(cfg)).items()
                                                           if k not in ("run_id", "tracking_uri")}})
    tracking.log_environment(client, cfg.run_id)
    # A failed or stopped trial leaves its run open: the driver closes it from Tune's outcome (`summarise`).
    if cfg.num_workers <= 1:
        train_runs([cfg], TuneSession(cfg.use_gpu))
    else:
        result = fit([cfg], callbacks=[TuneReportCallback()], evaluate_test=False)
        if result.error:
            raise result.error
    client.set_terminated(cfg.run_id, "FINISHED")


# ---------------------------------------------------------------- the search (driver)


def search(base: TrainConfig, space: dict, *, trials: int, storage_path: str, name: str, cpus_per_trial: float = 1.0,
           max_concurrent: int | None = None, grace_period: int = 3, reduction_factor: int = 2, seed: int = 0,
           resume: bool = False) -> dict:
    """Run (or resume) the search; returns the best trial's sampled values, its score and the parent run id."""
    import mlflow
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from erc import tracking

    storage = Path(storage_path).resolve()
    experiment_dir = storage / name
    client = mlflow.MlflowClient(base.tracking_uri)
    parent_file = storage / f"{name}.{PARENT_FILE}"
    restoring = resume and tune.Tuner.can_restore(str(experiment_dir))
    if restoring:
        parent_run_id = json.loads(parent_file.read_text())["parent_run_id"]
        # Trials cut off by the interruption start again under new runs.
        for run in client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
            client.set_tag(run.info.run_id, "tune_interrupted", "true")
            client.set_terminated(run.info.run_id, "KILLED")
    else:
        if experiment_dir.exists():
            raise ErcDataError(experiment_dir, "a search of this name exists: resume it or choose another name")
        parent = client.create_run(tracking.experiment_id(base.experiment, base.tracking_uri), tags={
            "mlflow.runName": f"tune {base.dataset}/{base.model}", "role": "tune", "model": base.model,
            "dataset": base.dataset, "tune_name": name})
        parent_run_id = parent.info.run_id
        storage.mkdir(parents=True, exist_ok=True)
        parent_file.write_text(json.dumps({"parent_run_id": parent_run_id}))
        client.log_dict(parent_run_id, space, "search_space.json")
        for key, value in {"trials": trials, "cpus_per_trial": cpus_per_trial, "max_concurrent": max_concurrent,
                           "grace_period": grace_period,
                           "reduction_factor": reduction_factor, "search_seed": seed, "objective": SELECT,
                           "scheduler": "ASHA", "search_alg": "Optuna TPE", "train_seed": base.seed,
                           "epochs": base.epochs}.items():
            client.log_param(parent_run_id, key, value)
    client.update_run(parent_run_id, "RUNNING")

    # A single-worker trial trains in the trial function itself, which holds all of cpus_per_trial; a multi-worker
    # trial's function (0.1 CPU) starts workers that share what is left.
    trial_cpus = cpus_per_trial if base.num_workers <= 1 else 0.1
    worker_cpus = cpus_per_trial if base.num_workers <= 1 else max(0.1, (cpus_per_trial - 0.1) / base.num_workers)
    base = replace(base, cpus_per_worker=worker_cpus)
    total_cpus = ray.cluster_resources().get("CPU", 1)
    concurrent = max_concurrent or max(1, int(total_cpus // cpus_per_trial))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=asdict(base), parent_run_id=parent_run_id, storage=str(storage / "train")),
        {"CPU": trial_cpus})
    if restoring:
        tuner = tune.Tuner.restore(str(experiment_dir), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(space),
            tune_config=tune.TuneConfig(
                metric=SELECT, mode="max", num_samples=trials,
                # max_t past the last epoch: a trial that is not stopped ends by itself and closes its own run,
                # rather than being stopped by Tune at max_t in the middle of that.
                scheduler=ASHAScheduler(max_t=base.epochs + 1, grace_period=grace_period,
                                        reduction_factor=reduction_factor),
                search_alg=ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrent),
                # A single-worker trial trains in its own actor: the next trial reuses it, imports and data loaded.
                reuse_actors=base.num_workers <= 1),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
        )
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        raise SearchInterrupted(name, 0, trials) from None
    done = results.num_terminated + results.num_errors
    if done < trials:  # Ctrl-C: Tune saved the search and returned early
        raise SearchInterrupted(name, done, trials)
    return summarise(client, parent_run_id, results, list(space), name, base.epochs)


class SearchInterrupted(Exception):
    def __init__(self, name: str, done: int, trials: int):
        super().__init__(f"search {name} interrupted after {done} of {trials} trials; "
                         "run the same command with --resume to finish it")


def summarise(client, parent_run_id: str, results, keys: list[str], name: str, epochs: int) -> dict:
    """Close the trials' runs, and give the parent run the best config, its score and the plots."""
    import pandas as pd

    rows = []
    for result in results:
        metrics = result.metrics or {}
        row = {k: result.config.get(k) for k in keys}
        row.update(trial_id=metrics.get("trial_id", ""), score=metrics.get("best_" + SELECT, math.nan),
                   epochs=metrics.get("training_iteration", 0), error=result.error is not None)
        rows.append(row)
    table = pd.DataFrame(rows)
    # Tune ends a trial that reaches max_t (all epochs) or that ASHA stops by interrupting it, so its own
    # closing of the run may be missing or say FAILED; Tune's outcome decides.
    outcome = {row.trial_id: row for row in table.itertuples()}
    for run in client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        trial = outcome.get(run.data.tags.get("tune_trial_id"))
        if trial is None or run.data.tags.get("tune_interrupted"):
            continue
        if trial.error:
            status = "FAILED"
        elif trial.epochs >= epochs or run.info.status == "FINISHED":
            status = "FINISHED"
        else:
            status = "KILLED"  # stopped by ASHA, or cut off by an interruption that Tune counts as its end
            client.set_tag(run.info.run_id, "tune_incomplete", "true")
        if run.info.status != status:
            client.set_terminated(run.info.run_id, status)
    scored = table[table["score"].notna()]
    if scored.empty:
        client.set_terminated(parent_run_id, "FAILED")
        raise RuntimeError(f"search {name}: no trial reported a validation score")
    best = scored.loc[scored["score"].idxmax()]
    best_config = {k: _plain(best[k]) for k in keys}
    for key, value in best_config.items():
        client.log_param(parent_run_id, f"best.{key}", value)
    client.log_metric(parent_run_id, "best_" + SELECT, float(best["score"]))
    client.log_metric(parent_run_id, "trials_finished", int((~table["error"]).sum()))
    client.set_tag(parent_run_id, "best_trial_id", str(best["trial_id"]))
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "trials.csv", index=False)
        client.log_artifact(parent_run_id, str(Path(tmp) / "trials.csv"))
        plot_scores(scored, keys, Path(tmp) / "score_vs_params.png")
        plot_parallel(scored, keys, Path(tmp) / "parallel_coordinates.png")
        client.log_artifact(parent_run_id, str(Path(tmp) / "score_vs_params.png"))
        client.log_artifact(parent_run_id, str(Path(tmp) / "parallel_coordinates.png"))
    client.set_terminated(parent_run_id, "FINISHED")
    return {"config": best_config, "score": float(best["score"]), "parent_run_id": parent_run_id,
            "trials": len(table), "table": table}


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _numeric(column):
    import pandas as pd

    values = pd.to_numeric(column, errors="coerce")
    if values.notna().all():
        return values, None
    categories = sorted(map(str, column.unique()))
    return column.map(lambda v: categories.index(str(v))).astype(float), categories


def plot_scores(table, keys: list[str], path) -> None:
    """Validation score against each searched value, one panel per key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        x, categories = _numeric(table[key])
        ax.scatter(x, table["score"], s=18)
        if categories:
            ax.set_xticks(range(len(categories)), categories)
        elif (x > 0).all() and x.max() / x.min() > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("best " + SELECT)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_parallel(table, keys: list[str], path) -> None:
    """Parallel coordinates: every trial a line across the searched values (each axis scaled to [0, 1]),
    coloured by its validation score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = []
    for key in keys:
        x, _ = _numeric(table[key])
        span = x.max() - x.min()
        columns.append((x - x.min()) / span if span else x * 0 + 0.5)
    score = table["score"].to_numpy()
    norm = (score - score.min()) / ((score.max() - score.min()) or 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 3, 4))
    cmap = plt.get_cmap("viridis")
    data = np.stack([c.to_numpy() for c in columns] + [norm], axis=1)
    for row, shade in zip(data, norm):
        ax.plot(range(len(keys) + 1), row, color=cmap(shade), alpha=0.8)
    ax.set_xticks(range(len(keys) + 1), keys + ["best " + SELECT], rotation=30, ha="right")
    ax.set_ylabel("scaled value")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(score.min(), score.max())), ax=ax, label=SELECT)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the best-config file


def write_best(path, *, dataset: str, model: str, best: dict, command: str) -> None:
    """The tracked file the train stage takes with `--config`: the best trial's train and model values."""
    config = best["config"]
    body = {
        "dataset": dataset, "model": model,
        "train": {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("train.")},
        "model_config": {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("model.")},
        "val_wf1": round(best["score"], 4), "trials": best["trials"], "mlflow_parent_run_id": best["parent_run_id"],
    }
    with atomic_path(path) as tmp:
        tmp.write_text(f"# Written by `{command}`: the best of {best['trials']} trials on validation weighted F1.\n"
                       + yaml.safe_dump(body, sort_keys=False))


def apply_best(params: dict, path, dataset: str, model: str) -> dict:
    """`params` with a best-config file's values as `dataset`/`model` overrides (checked against both)."""
    try:
        tuned = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ErcDataError(path, f"unreadable tuned config ({str(e).splitlines()[0]})") from None
    if not isinstance(tuned, dict) or {"dataset", "model", "train", "model_config"} - set(tuned):
        raise ErcDataError(path, "not a tuned config (needs dataset, model, train, model_config)")
    if (tuned["dataset"], tuned["model"]) != (dataset, model):
        raise ErcDataError(path, f"tuned for {tuned['dataset']}/{tuned['model']}, not {dataset}/{model}")
    train = params.setdefault("train", {})
    per_model = train.setdefault("per_model", {}) or {}
    train["per_model"] = per_model
    entry = per_model.setdefault(model, {}) or {}
    per_model[model] = entry
    per_dataset = entry.setdefault("per_dataset", {}) or {}
    entry["per_dataset"] = per_dataset
    per_dataset[dataset] = {**(per_dataset.get(dataset) or {}), **(tuned["train"] or {})}
    models = params.setdefault("models", {})
    models[model] = {**(models.get(model) or {}), **(tuned["model_config"] or {})}
    return params


def discard(storage_path, name: str) -> None:
    """Remove an earlier search of this name (its Tune state and parent-run pointer); its MLflow runs stay."""
    import shutil

    storage = Path(storage_path).resolve()
    shutil.rmtree(storage / name, ignore_errors=True)
    (storage / f"{name}.{PARENT_FILE}").unlink(missing_ok=True)


def default_name(dataset: str, model: str) -> str:
    return f"tune-{dataset}-{model}"

