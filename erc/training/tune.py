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
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from erc.errors import ErcDataError
from erc.io import atomic_path
from erc.schema import field_problem
from erc.training.config import SELECT, TrainConfig, model_schema, train_schema

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
NOT_SEARCHED = {"protocol", "paper_entry", "paper_train_on_valid"}  # a search is erc's protocol, params' own settings
PARENT_FILE = "mlflow_parent_run.json"  # beside Tune's experiment state: a resumed search keeps its parent run


def space_for(params: dict, model: str, source="params.yaml") -> dict:
    """The search space of `model`: `tune.space.all` then `tune.space.<model>`, each key checked against its config
    field with the schema that checks params (every bound or choice in the field's range), before anything starts."""
    spaces = (params.get("tune") or {}).get("space") or {}
    space, section_of = {}, {}
    for section in ("all", model):
        for key, spec in (spaces.get(section) or {}).items():
            space[key], section_of[key] = spec, f"tune.space.{section}"
    for key, spec in space.items():
        problem = space_problem(key, spec, model)
        if problem:
            raise ErcDataError(source, f"{section_of[key]}: {key}{problem}")
    return space


def space_problem(key: str, spec, model: str) -> str | None:
    """What is wrong with the distribution `spec` of `key`, worded to follow the key (None: nothing)."""
    section, _, name = key.partition(".")
    schema = train_schema() if section == "train" else model_schema(model) if section == "model" else None
    if name not in getattr(schema, "model_fields", {}):
        return f" is neither train.<field> nor model.<{model} field>"
    if section == "train" and name in NOT_SEARCHED:
        return ": a protocol setting, never searched"
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        return f": expected one of {DISTRIBUTIONS} with its arguments, got {spec!r}"
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not (isinstance(args, list) and args):
            return f": choice needs a list of options, got {args!r}"
        values = [("choice", option) for option in args]
    else:
        number = int if kind == "randint" else (int, float)
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, number) and not isinstance(a, bool)
                                                                  for a in args) and args[0] < args[1]):
            text = any(isinstance(a, str) for a in args) if isinstance(args, list) else False
            return (f": {kind} needs [low, high] {'integers' if kind == 'randint' else 'numbers'} with low < high, got "
                    f"{args!r}" + (" (YAML reads 1e-4 as text: write 1.0e-4)" if text else ""))
        if kind == "loguniform" and args[0] <= 0:
            return ": loguniform needs a positive low bound"
        # randint's high is excluded: its largest draw is high - 1
        values = [("lower bound", args[0]),
                  ("largest draw", args[1] - 1) if kind == "randint" else ("upper bound", args[1])]
    for label, value in values:
        problem = field_problem(schema, name, value)
        if problem:
            return f" {label} {problem}"
    if kind in ("uniform", "loguniform") and field_problem(schema, name, math.nextafter(args[0], args[1])):
        return f": {kind} draws fractions, and the field takes whole numbers: use randint or choice"
    return None


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
        "tune_trial_id": trial, "model": cfg.model, "dataset": cfg.dataset, "seed": str(cfg.seed),
        **tracking.owner_tags()})
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
    running = running_parent(client, parent_file)
    if running:  # its folder may hold no state yet: it must not be taken for a killed search's leftovers
        raise ErcDataError(experiment_dir, f"a search of this name is running (process "
                                           f"{running.data.tags.get('driver_pid')}): wait for it or choose another name")
    restoring = resume and resumable(experiment_dir)
    if restoring:
        parent_run_id = json.loads(parent_file.read_text())["parent_run_id"]
        close_trials(client, parent_run_id, "KILLED")
        for tag, value in tracking.owner_tags().items():  # this process holds it now (the sweep judges by them)
            client.set_tag(parent_run_id, tag, value)
    else:
        if resumable(experiment_dir):
            raise ErcDataError(experiment_dir, "a search of this name exists: resume it or choose another name")
        discard(storage, name)  # a folder without a saved search (one killed as it began): nothing to resume
        parent = client.create_run(tracking.experiment_id(base.experiment, base.tracking_uri), tags={
            "mlflow.runName": f"tune {base.dataset}/{base.model}", "role": "tune", "model": base.model,
            "dataset": base.dataset, "tune_name": name, **tracking.owner_tags()})
        parent_run_id = parent.info.run_id
    try:
        if not restoring:
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

        # A single-worker trial trains in the trial function itself, which holds all of cpus_per_trial; a
        # multi-worker trial's function (0.1 CPU) starts workers that share what is left.
        trial_cpus = cpus_per_trial if base.num_workers <= 1 else 0.1
        worker_cpus = cpus_per_trial if base.num_workers <= 1 else max(0.1, (cpus_per_trial - 0.1) / base.num_workers)
        base = replace(base, cpus_per_worker=worker_cpus)
        total_cpus = ray.cluster_resources().get("CPU", 1)
        concurrent = max_concurrent or max(1, int(total_cpus // cpus_per_trial))
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=asdict(base), parent_run_id=parent_run_id,
                                 storage=str(storage / "train")),
            # a single-worker trial trains in its own process, which must hold the GPU it asks for
            {"CPU": trial_cpus, **({"GPU": 1} if base.use_gpu and base.num_workers <= 1 else {})})
        if restoring:
            tuner = tune.Tuner.restore(str(experiment_dir), trainable, resume_unfinished=True, restart_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=to_tune(space),
                tune_config=tune.TuneConfig(
                    metric=SELECT, mode="max", num_samples=trials,
                    # max_t past the last epoch: a trial that is not stopped ends by itself and closes its own run,
                    # rather than being stopped by Tune at max_t in the middle of that. A grace period past max_t
                    # (which ASHA refuses) means what max_t means: no trial stopped early.
                    scheduler=ASHAScheduler(max_t=base.epochs + 1, grace_period=min(grace_period, base.epochs + 1),
                                            reduction_factor=reduction_factor),
                    search_alg=ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrent),
                    # A single-worker trial trains in its own actor: the next trial reuses it, imports and data loaded.
                    reuse_actors=base.num_workers <= 1),
                run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
            )
        results = tuner.fit()
        done = results.num_terminated + results.num_errors
        if done < trials:  # Ctrl-C: Tune saved the search and returned early
            raise SearchInterrupted(name, done, trials)
        return summarise(client, parent_run_id, results, list(space), name, base.epochs)
    except BaseException as e:
        # No run is left RUNNING, and no folder that would refuse the next search of this name unless it holds a
        # state to resume: an interrupted search's, or the state that a failed resume started from.
        interrupted = isinstance(e, (KeyboardInterrupt, SearchInterrupted))
        status = "KILLED" if interrupted else "FAILED"
        close_trials(client, parent_run_id, status)
        client.set_terminated(parent_run_id, status)
        kept = (interrupted or restoring) and resumable(experiment_dir)
        if not kept:
            discard(storage, name)
        if isinstance(e, KeyboardInterrupt) or (interrupted and not kept):
            raise SearchInterrupted(name, getattr(e, "done", 0), trials, kept) from None
        raise


def running_parent(client, parent_file: Path):
    """The parent run of the search whose pointer is `parent_file`, where it is RUNNING in a live process."""
    from erc import tracking

    if not parent_file.is_file():
        return None
    try:
        run = client.get_run(json.loads(parent_file.read_text())["parent_run_id"])
    except Exception:  # a pointer to another store, or a torn file: no search of this store runs by it
        return None
    return run if run.info.status == "RUNNING" and tracking.owner_alive(run) else None


def resumable(experiment_dir: Path) -> bool:
    """Tune saved a search here that `--resume` continues: its tuner, and the experiment state that Tune writes once
    the search runs (the tuner alone, written as the search is set up, cannot be resumed: Tune refuses it)."""
    from ray import tune

    return tune.Tuner.can_restore(str(experiment_dir)) and any(experiment_dir.glob("experiment_state-*.json"))


def close_trials(client, parent_run_id: str, status: str) -> None:
    """End the trial runs left open under the parent, cut off by an interruption or a failure; tagged so that
    `summarise` leaves them be (a resumed search trains such a trial again, under a new run)."""
    for run in client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "tune_interrupted", "true")
        client.set_terminated(run.info.run_id, status)


class SearchInterrupted(Exception):
    def __init__(self, name: str, done: int, trials: int, resumable: bool = True):
        self.done = done
        super().__init__(f"search {name} interrupted after {done} of {trials} trials; " + (
            "run the same command with --resume to finish it" if resumable else
            "it saved nothing to resume: run the same command to start it again"))


class SearchFailed(Exception):
    """A search that ended without a best config (no trial reported a score): one line, with the first trial error."""


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
    table = pd.DataFrame(rows, columns=[*keys, "trial_id", "score", "epochs", "error"])  # columns even for no trial
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
    if scored.empty:  # `search` ends the parent run FAILED as it does for any error
        errors = [result.error for result in results if result.error is not None]
        first = f"; the first trial error: {_last_line(errors[0])}" if errors else ""
        raise SearchFailed(f"search {name}: no trial reported a validation score ({len(table)} trials){first}")
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


def _last_line(error) -> str:
    """An exception in one line: a trial's error reaches the driver with its whole traceback in its text."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


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

