"""DVC stage ``select``: pick the champion from the evaluation summaries and register it in MLflow.

Inputs: ``build/eval/<model>/summary.json`` for every model in ``params.yaml: models`` (contract §3).
Outputs:

- ``build/registry/selection.json`` — the rule, every candidate's verdict, the champion and the
  reason. A pure function of the metrics and params (no run ids, versions or timestamps), so it is
  byte-identical on every machine and diffs only when the decision or its inputs change.
- the MLflow Model Registry: the champion's logged model registered under ``registry.model_name``,
  alias ``registry.alias`` moved to it, earlier versions kept, tags/description recording why.
- ``build/registry/champion.json`` — which registry version is now the champion. Version numbers
  depend on the local store, which is why they live here and not in selection.json.

Re-running is idempotent: if the champion's logged model (same run id and source) is already a
version, that version is reused instead of registering a duplicate.

Concurrency rule (several ``dvc repro`` against one tracking server): the registry part runs under
a lock, the registered model ``<name>.select-lock``. Creating a registered model is atomic in
MLflow's SQL store (unique name), so exactly one select holds it; the others wait up to
``LOCK_WAIT_S`` and then fail naming the holder. Under the lock a select (1) checks that the
champion's MLflow run was logged on the data its summary claims (``data_version`` tag), (2)
registers/tags the version, moves the alias and records ``selection_seq`` (previous + 1) with the
champion's version, run and data version on the registered model, and (3) re-reads the alias and
those tags and refuses if they are not its own. So the alias always ends on the version chosen by
the last select to finish, with tags describing that same selection and data; a select that lost
never reports success (and ``promote`` refuses an alias that matches no local evaluation).
A crashed select leaves the lock behind: ``python -m registry.select --break-lock`` removes it.

Usage: ``python -m registry.select [--params params.yaml] [--eval-dir build/eval] [--out-dir
build/registry] [--no-register]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.params import Params, as_params
from experiments.artifacts import EVAL_DIR, REGISTRY_DIR
from experiments.runtime import stage_main
from registry.rule import (
    Candidate,
    NoEligibleCandidateError,
    Selection,
    SelectionError,
    SelectionRule,
    select,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("registry.select")

SELECTION_FILE = "selection.json"
CHAMPION_FILE = "champion.json"
#: MLflow caps tag values; the reason is short, but never let a long one fail registration.
_MAX_TAG = 4900
#: The lock is a registered model with this suffix (atomic create = acquire, delete = release).
LOCK_SUFFIX = ".select-lock"
#: How long a select waits for another one to finish its registry update (seconds; they take ~1 s).
LOCK_WAIT_S = 300.0
LOCK_POLL_S = 0.2


class RegistryError(RuntimeError):
    """Selection inputs or the registry are not in a state the stage can work with."""


@dataclass(frozen=True)
class EvalSummary:
    """The parts of ``build/eval/<model>/summary.json`` the registry relies on (contract §3)."""

    model: str
    run_id: str
    model_uri: str
    metrics: dict[str, Any]
    path: Path
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RegistryError(f"{path}: not found (did the evaluate stage run for this model?)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path}: unreadable JSON ({exc})") from exc


def load_summary(eval_dir: Path, model: str) -> EvalSummary:
    """Read and check one summary; metrics missing from it are filled from metrics.json."""
    path = eval_dir / model / "summary.json"
    data = _read_json(path)
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    for key in ("run_id", "model_uri"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RegistryError(f"{path}: field {key!r} must be a non-empty string")
    if not re.fullmatch(r"[0-9A-Za-z_-]+", data["run_id"]):
        raise RegistryError(f"{path}: run_id {data['run_id']!r} is not an MLflow run id")
    if data.get("model", model) != model:
        raise RegistryError(f"{path}: field 'model' is {data['model']!r}, expected {model!r}")
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise RegistryError(f"{path}: field 'metrics' must be an object")
    metrics_file = eval_dir / model / "metrics.json"
    if metrics_file.is_file():
        extra = _read_json(metrics_file)
        if isinstance(extra, dict):
            metrics = {**extra, **metrics}
    return EvalSummary(
        model=model, run_id=data["run_id"], model_uri=data["model_uri"], metrics=metrics, path=path, raw=data
    )


def load_summaries(eval_dir: Path, models: Sequence[str]) -> dict[str, EvalSummary]:
    """Summaries for exactly the models named in params (stale folders of removed models are ignored)."""
    if not models:
        raise RegistryError("params.yaml: models is empty; nothing to select from")
    return {name: load_summary(eval_dir, name) for name in sorted(models)}


def registry_params(params: Params | Mapping[str, Any]) -> tuple[str, str]:
    """``(registry.model_name, registry.alias)`` (typed: quotes, which would break MLflow's filter
    strings, are refused by the section)."""
    registry = as_params(params).need("registry")
    return registry.model_name, registry.alias


def choose(params: Params | Mapping[str, Any], eval_dir: Path) -> tuple[Selection, dict[str, EvalSummary]]:
    """Apply the selection rule to the evaluated models named in params."""
    params = as_params(params)
    rule = SelectionRule.from_params(params.need("selection"))
    models = params.model_names
    summaries = load_summaries(eval_dir, list(models))
    selection = select([Candidate(n, s.metrics) for n, s in summaries.items()], rule)
    return selection, summaries


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; record them as strings so the verdict explains itself."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent, trailing newline), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)


def selection_document(selection: Selection) -> dict[str, Any]:
    """selection.json content: only the rule's inputs and outputs, nothing machine-specific."""
    return {"schema_version": 1, **selection.to_dict()}


# --------------------------------------------------------------------------------------------------
# MLflow Model Registry
# --------------------------------------------------------------------------------------------------


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``, or None if the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def find_version(client: MlflowClient, name: str, run_id: str, model_uri: str) -> ModelVersion | None:
    """An existing version of ``name`` built from this run's logged model (oldest if several)."""
    from mlflow.exceptions import MlflowException

    try:
        # run ids are hex; quotes in the name are rejected by registry_params.
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    matches = [v for v in versions if v.run_id == run_id and v.source == model_uri]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(
            name,
            description=(
                "Anomaly-detection models for visual inspection (ONNX, anomalib export). "
                "Versions are registered by the DVC `select` stage; the alias marks the served champion."
            ),
        )


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def registry_lock(
    client: MlflowClient, model_name: str, *, wait_s: float = LOCK_WAIT_S, poll_s: float = LOCK_POLL_S
) -> Iterator[str]:
    """Hold ``<model_name>.select-lock`` (see the module docstring); yields this holder's token.

    Why a registered model: it is the one MLflow object whose creation fails atomically when it
    already exists (RESOURCE_ALREADY_EXISTS from the store's unique key), on every backend store.
    """
    from mlflow.exceptions import MlflowException

    name = lock_name(model_name)
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + wait_s
    rng = random.Random(token)
    while True:
        try:
            client.create_registered_model(
                name,
                tags={"holder": token, "acquired_at": f"{time.time():.3f}"},
                description=f"Lock held while registry.select updates {model_name!r}; deleted when done.",
            )
            break
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
        if time.monotonic() > deadline:
            holder = "unknown"
            with contextlib.suppress(MlflowException):
                holder = client.get_registered_model(name).tags.get("holder", "unknown")
            raise RegistryError(
                f"registered model {name!r} (the select lock) is still held by {holder} after {wait_s:.0f}s: "
                "another select is updating the registry. If none is running (a crashed one left the "
                "lock), run `python -m registry.select --break-lock`"
            )
        time.sleep(poll_s * (1 + rng.random()))
    log.info("holding %s (%s)", name, token)
    try:
        yield token
    finally:
        try:
            holder = client.get_registered_model(name).tags.get("holder")
            if holder == token:
                client.delete_registered_model(name)
            else:
                log.warning("%s is now held by %s (lock broken?); leaving it", name, holder)
        except MlflowException as exc:
            log.warning("could not release %s: %s", name, exc)


def break_lock(client: MlflowClient, model_name: str) -> bool:
    """Delete a lock left by a crashed select; True if there was one."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock_name(model_name))
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def check_run_data(client: MlflowClient, summary: EvalSummary) -> None:
    """Refuse a champion whose MLflow run was logged on other data than its summary claims."""
    claimed = str(summary.get("data_version", "") or "")
    logged = client.get_run(summary.run_id).data.tags.get("data_version", "")
    if claimed and logged and claimed != logged:
        raise RegistryError(
            f"{summary.path}: run {summary.run_id} was logged on data {logged!r} but the summary claims "
            f"{claimed!r}; re-run the evaluate stage so build/eval and MLflow agree"
        )


def _selection_seq(client: MlflowClient, model_name: str) -> int:
    raw = client.get_registered_model(model_name).tags.get("selection_seq", "0")
    try:
        return int(raw)
    except ValueError:
        return 0


def verify_champion(
    client: MlflowClient, model_name: str, alias: str, version: str, summary: EvalSummary, seq: int
) -> None:
    """Re-read what this select wrote; any difference means someone wrote without the lock."""
    now = alias_version(client, model_name, alias)
    reg_tags = client.get_registered_model(model_name).tags
    problems = []
    if now is None or str(now.version) != version:
        problems.append(f"alias {alias} is on {None if now is None else now.version}, expected {version}")
    elif now.tags.get("data_version", "") != str(summary.get("data_version", "")):
        problems.append(f"version {version} is tagged with data {now.tags.get('data_version')!r}")
    if reg_tags.get("selection_seq") != str(seq) or reg_tags.get("champion_version") != version:
        problems.append(
            f"selection_seq/champion_version are {reg_tags.get('selection_seq')}/"
            f"{reg_tags.get('champion_version')}, expected {seq}/{version}"
        )
    if problems:
        raise RegistryError(
            f"registry {model_name!r} changed under this select ({'; '.join(problems)}): another writer "
            "bypassed the select lock; re-run `dvc repro` (select) to restore a consistent champion"
        )


def register_champion(
    client: MlflowClient,
    selection: Selection,
    summary: EvalSummary,
    *,
    model_name: str,
    alias: str,
    lock_wait_s: float = LOCK_WAIT_S,
) -> dict[str, Any]:
    """Register (or reuse) the champion's version, tag it, move the alias; return champion.json data.

    Runs under :func:`registry_lock`, so concurrent selects are serialised (module docstring).
    """
    check_run_data(client, summary)
    with registry_lock(client, model_name, wait_s=lock_wait_s) as token:
        _ensure_registered_model(client, model_name)
        return _register_locked(client, selection, summary, model_name=model_name, alias=alias, token=token)


def _register_locked(
    client: MlflowClient,
    selection: Selection,
    summary: EvalSummary,
    *,
    model_name: str,
    alias: str,
    token: str,
) -> dict[str, Any]:
    import mlflow
    from mlflow.exceptions import MlflowException

    seq = _selection_seq(client, model_name) + 1
    previous = alias_version(client, model_name, alias)
    existing = find_version(client, model_name, summary.run_id, summary.model_uri)
    if existing is not None:
        version = str(existing.version)
        log.info("reusing %s version %s (run %s already registered)", model_name, version, summary.run_id)
    else:
        try:
            mv = mlflow.register_model(summary.model_uri, model_name)
        except MlflowException as exc:
            raise RegistryError(
                f"cannot register {summary.model_uri} (run {summary.run_id}, {summary.path}) as "
                f"{model_name!r}: {exc}"
            ) from exc
        version = str(mv.version)
        log.info("registered %s as %s version %s", summary.model_uri, model_name, version)

    metric = selection.rule.metric
    metric_value = selection.verdict(selection.champion).metric
    tags = {
        "model": summary.model,
        "selection_metric": metric,
        "selection_metric_value": repr(metric_value),
        "selection_reason": selection.reason[:_MAX_TAG],
        "selection_ranked_by": selection.ranked_by[:_MAX_TAG],
        "test_set": selection.test_set,
        "run_id": summary.run_id,
        "git_commit": str(summary.get("git_commit", "")),
        "data_version": str(summary.get("data_version", "")),
        "pipeline_id": str(summary.get("pipeline_id", "")),
        "selected_by": "registry.select",
        "selection_seq": str(seq),
    }
    moved = previous is None or str(previous.version) != version
    if moved:
        tags["previous_champion"] = "none" if previous is None else str(previous.version)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.update_model_version(
        model_name,
        version,
        description=(
            f"{summary.model} selected as {alias} by the params.yaml selection rule: {selection.reason}. "
            f"MLflow run {summary.run_id}, git commit {summary.get('git_commit', 'unknown')}, "
            f"data version {summary.get('data_version', 'unknown')}."
        )[:_MAX_TAG],
    )
    client.set_registered_model_alias(model_name, alias, version)
    for key, value in {
        "champion_version": version,
        "champion_run_id": summary.run_id,
        "champion_data_version": str(summary.get("data_version", "")),
        "selection_holder": token,
        "selection_seq": str(seq),
    }.items():
        client.set_registered_model_tag(model_name, key, value)
    verify_champion(client, model_name, alias, version, summary, seq)
    if previous is not None and moved:
        log.info("alias %s moved from version %s to %s", alias, previous.version, version)

    return {
        "name": model_name,
        "alias": alias,
        "version": version,
        "model": summary.model,
        "run_id": summary.run_id,
        "model_uri": summary.model_uri,
        "reason": selection.reason,
        "metric": metric,
        "metric_value": metric_value,
        "previous_version": None if previous is None else str(previous.version),
        "reused_existing_version": existing is not None,
        "selection_seq": seq,
    }


def run(
    params: Params | Mapping[str, Any],
    *,
    eval_dir: Path,
    out_dir: Path,
    register: bool = True,
    client: MlflowClient | None = None,
) -> dict[str, Any]:
    """The whole stage; returns the champion record (or the selection document if not registering).

    When no candidate is eligible, selection.json still records every verdict (champion ``null``)
    so the failed stage leaves the explanation behind, and the error propagates.
    """
    params = as_params(params)
    model_name, alias = registry_params(params)  # validate before any side effect
    try:
        selection, summaries = choose(params, eval_dir)
    except NoEligibleCandidateError as exc:
        write_json(
            out_dir / SELECTION_FILE,
            {
                "schema_version": 1,
                "rule": SelectionRule.from_params(params.need("selection")).to_dict(),
                "champion": None,
                "reason": str(exc),
                "candidates": [v.to_dict() for v in exc.verdicts],
            },
        )
        (out_dir / CHAMPION_FILE).unlink(missing_ok=True)
        raise
    write_json(out_dir / SELECTION_FILE, selection_document(selection))
    log.info("champion: %s", selection.reason)
    if not register:
        return selection_document(selection)
    if client is None:
        from registry.mlflow_client import get_client

        client = get_client()
    record = register_champion(
        client, selection, summaries[selection.champion], model_name=model_name, alias=alias
    )
    write_json(out_dir / CHAMPION_FILE, record)
    return record


@stage_main("select", SelectionError, RegistryError)
def main(argv: Sequence[str] | None = None) -> int:
    from config.params import ParamsError, load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--eval-dir", type=Path, default=Path(EVAL_DIR))
    parser.add_argument("--out-dir", type=Path, default=Path(REGISTRY_DIR))
    parser.add_argument(
        "--no-register", action="store_true", help="only apply the rule and write selection.json"
    )
    parser.add_argument(
        "--break-lock", action="store_true", help="delete the select lock a crashed select left, then exit"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        if args.break_lock:
            from registry.mlflow_client import get_client

            name, _ = registry_params(params)
            removed = break_lock(get_client(), name)
            print(f"select: lock {lock_name(name)!r} {'removed' if removed else 'was not held'}")
            return 0
        record = run(params, eval_dir=args.eval_dir, out_dir=args.out_dir, register=not args.no_register)
    except (ParamsError, SelectionError, RegistryError) as exc:
        print(f"select: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(_json_safe(record), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
