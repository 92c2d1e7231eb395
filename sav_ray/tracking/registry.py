"""MLflow registry adapter: register SAV artifacts as models, load them back, move aliases.

`load_artifact_ref` accepts an artifact folder or a registry URI (`models:/NAME@ALIAS`,
`models:/NAME/VERSION`) and always ends in the project's one loader, `load_artifact`.

A registered version is an MLflow pyfunc model logged from code (`sav_ray/tracking/pyfunc_model.py`,
nothing pickled) that carries the `sav_ray` package's source as its `code_paths`, so it loads
where sav-ray is not installed: MLflow puts `code/` first on `sys.path` before it runs the model
file, and `requirements.txt` pins only public packages (`pip_requirements`). `mlflow models
serve/predict` and `spark_udf` can build its environment. Its folder, as
`mlflow.artifacts.download_artifacts("models:/NAME@ALIAS")` gives it:

    MLmodel, pyfunc_model.py, requirements.txt, python_env.yaml, conda.yaml
    code/sav_ray/             the package's source as it was when the version was logged
    artifacts/sav/            the SAV artifact: sav.json, centroids.safetensors, head_scores...

Tags on the registered model and on each version: `base_model`, `revision`, `schema_version`,
`selection`, `k` (versions also `artifact_digest`, `labels`). A new version gets the alias
`candidate`. `jobs/evaluate.py` adds `eval.*` tags to a version; `promote` reads them:

    register_artifact("pets", artifact, "/abs/sav")        # in an active run: version, alias
    promote("pets", "candidate", "production", min_accuracy=0.9, must_beat="production")
    rollback("pets", "production")                          # back to the version before
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sav_ray import __version__
from sav_ray.core.artifact import BaseModelInfo, SavArtifact, load_artifact
from sav_ray.core.errors import ConfigError
from sav_ray.tracking.runs import SAV_SUBDIR, tracking_uri

CANDIDATE = "candidate"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # sav_ray/, logged as the model's code
CODE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
MODEL_NAME = "sav"  # the LoggedModel's name inside the fit run
ACCURACY_TAG = "eval.accuracy"
DATA_TAG = "eval.data_sha256"
# What a registered model imports when it loads and predicts: pyfunc_model.py and the core
# under it (artifact, models, processors, classify, images, video), nothing of Ray, Serve or
# the plots. sav-ray itself is not listed: no package index has it, and the model carries its
# source (code/sav_ray). Pinned to the versions installed where the version is logged, i.e.
# where its predictions were made and checked:
RUNTIME_REQUIREMENTS = (
    "mlflow",  # loads the pyfunc (and brings pandas, pyarrow, ...)
    "pandas",  # pyfunc_model.py's input and output frames
    "torch",
    "transformers",  # the base model and its processor
    "accelerate",  # transformers loads the weights through it when it is installed
    "safetensors",  # centroids.safetensors
    "jsonschema",  # sav.json is validated on load
    "numpy",
    "pillow",  # the `image` column
    "av",  # the `video` column (sav_ray.core.video)
    "num2words",  # SmolVLM's processor imports it
)


class RegistryError(LookupError):
    """A registry reference or alias cannot be used; the message names it and how to fix it."""


class PromotionRefused(ValueError):
    """A promotion gate said no; the message gives the numbers."""


def is_registry_ref(ref: str) -> bool:
    return ref.startswith("models:/")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/VERSION` -> (NAME, None, VERSION)."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in body:
        name, number = body.rsplit("/", 1)
        if name and number.isdigit():
            return name, None, number
    raise RegistryError(
        f"{ref}: not a model version reference; give models:/NAME@ALIAS or models:/NAME/VERSION"
    )


def check_model_name(name: str | None) -> None:
    """A name for --register (None: not registering)."""
    if name is not None and (not name or re.search(r"[/@:]", name)):
        raise ConfigError(
            f"--register {name!r}: a model name must be non-empty and hold no '/', '@' or ':' "
            "(they separate name, alias and version in models:/NAME@ALIAS)"
        )


def client(uri: str | None = None) -> Any:
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _missing(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _registered_model(c: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(name)
    except MlflowException as e:
        if _missing(e):
            raise RegistryError(
                f"no registered model {name!r} in {c.tracking_uri}; register one with "
                f"jobs/fit.py --register {name}, or check the tracking URI "
                "(MLFLOW_TRACKING_URI or --tracking-uri)"
            ) from None
        raise


def _alias_version(c: Any, name: str, alias: str) -> Any | None:
    """The version `alias` points to, None when the model has no such alias."""
    number = _registered_model(c, name).aliases.get(alias)
    return None if number is None else c.get_model_version(name, str(number))


def model_version(ref: str, uri: str | None = None) -> Any:
    """The ModelVersion behind `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    from mlflow.exceptions import MlflowException

    name, alias, number = parse_ref(ref)
    c = client(uri)
    if alias:
        mv = _alias_version(c, name, alias)
        if mv is None:
            aliases = sorted(_registered_model(c, name).aliases)
            raise RegistryError(
                f"{ref}: model {name!r} has no alias {alias!r} (its aliases: {aliases}); "
                f"jobs/fit.py --register sets {CANDIDATE!r}, jobs/promote.py moves the others"
            )
        return mv
    _registered_model(c, name)
    try:
        return c.get_model_version(name, number)
    except MlflowException as e:
        if _missing(e):
            raise RegistryError(f"{ref}: model {name!r} has no version {number}") from None
        raise


def download_artifact(ref: str, dst: str | Path | None = None, uri: str | None = None) -> Path:
    """The local folder of the SAV artifact behind `ref` (downloaded for registry URIs).

    An alias is resolved to its version first, so a concurrent promotion cannot mix versions.
    The version's own location is downloaded: MLflow's `models:/` download would ask the
    process-wide registry, not `uri`.
    """
    if not is_registry_ref(ref):
        return Path(ref)
    import mlflow

    uri = uri or tracking_uri()
    mv = model_version(ref, uri)
    location = client(uri).get_model_version_download_uri(mv.name, mv.version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=location, dst_path=None if dst is None else str(dst), tracking_uri=uri
    )
    folder = Path(local) / "artifacts" / SAV_SUBDIR
    if not folder.is_dir():
        raise RegistryError(f"{ref}: not a SAV model (no artifacts/{SAV_SUBDIR} in it)")
    return folder


def load_artifact_ref(
    ref: str, expect: BaseModelInfo | None = None, uri: str | None = None
) -> SavArtifact:
    """Load an artifact folder or `models:/...` reference through `load_artifact`."""
    if not is_registry_ref(ref):
        return load_artifact(ref, expect=expect)
    with tempfile.TemporaryDirectory(prefix="sav-model-") as tmp:
        return load_artifact(download_artifact(ref, tmp, uri), expect=expect)


def artifact_tags(artifact: SavArtifact) -> dict[str, str]:
    """The tags a registered model and its versions carry about the artifact."""
    base = artifact.base_model
    return {
        "base_model": base.name_or_path,
        "revision": base.revision or "",
        "schema_version": str(artifact.schema_version),
        "selection": artifact.selection.method,
        "k": str(artifact.selection.k),
    }


def pyfunc_signature() -> Any:
    """Input and output columns of the pyfunc model (see sav_ray/tracking/pyfunc_model.py)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(DataType.string, "text"),
                ColSpec(DataType.string, "image", required=False),
                ColSpec(DataType.string, "video", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(Map(DataType.long), "votes"),
                ColSpec(Map(DataType.double), "scores"),
                ColSpec(Map(DataType.double), "probabilities", required=False),
                ColSpec(DataType.boolean, "decision", required=False),
            ]
        ),
    )


def pip_requirements() -> list[str]:
    """`name==version` of each RUNTIME_REQUIREMENTS distribution installed here: what the
    model's environment needs, all on the public PyPI (explicit, so MLflow does not load the
    model to infer them). A local version label is dropped (torch `2.5.1+cpu` -> `2.5.1`): the
    index of such builds is not PyPI, and PyPI's wheel of the same release computes the same."""
    pins = []
    for dist in RUNTIME_REQUIREMENTS:
        try:
            pins.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(dist)
    return pins


def register_artifact(
    name: str, artifact: SavArtifact, artifact_dir: str | Path, alias: str = CANDIDATE
) -> Any:
    """Log `artifact_dir` as a pyfunc model in the active run, register it as a new version of
    `name` with tags and `alias`, and return the ModelVersion. On any failure no version of
    this run is left behind."""
    import mlflow

    check_model_name(name)
    run_id = mlflow.active_run().info.run_id
    c = client(mlflow.get_tracking_uri())
    staging = tempfile.TemporaryDirectory(prefix="sav-register-")
    try:
        # MLflow stores a logged folder under its own base name: stage it as SAV_SUBDIR so
        # download_artifact finds it whatever --output was called.
        staged = Path(staging.name) / SAV_SUBDIR
        shutil.copytree(artifact_dir, staged)
        # The package's source, without bytecode, becomes the model's code/sav_ray.
        code = Path(staging.name) / "code" / PACKAGE_DIR.name
        shutil.copytree(PACKAGE_DIR, code, ignore=CODE_IGNORE)
        with warnings.catch_warnings():
            # The signature is given; an input example would load the base model at log time.
            warnings.filterwarnings("ignore", message="(?i).*input example", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(PYFUNC_FILE),
                artifacts={SAV_SUBDIR: str(staged)},
                code_paths=[str(code)],
                signature=pyfunc_signature(),
                pip_requirements=pip_requirements(),
                metadata={
                    "sav_schema_version": artifact.schema_version,
                    "sav_ray_version": __version__,  # of the source in code/sav_ray
                },
                registered_model_name=name,
            )
        number = str(info.registered_model_version)
        tags = artifact_tags(artifact)
        for key, value in tags.items():
            c.set_registered_model_tag(name, key, value)
        version_tags = {
            **tags,
            "artifact_digest": artifact.digest,
            "labels": json.dumps(artifact.labels),
        }
        for key, value in version_tags.items():
            c.set_model_version_tag(name, number, key, value)
        c.set_registered_model_alias(name, alias, number)
    except BaseException:
        _delete_versions_of_run(c, name, run_id)
        raise
    finally:
        staging.cleanup()
    return c.get_model_version(name, number)


def _delete_versions_of_run(c: Any, name: str, run_id: str) -> None:
    try:
        for mv in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            c.delete_model_version(name, mv.version)
    except Exception:  # the registration error is the one to report
        pass


def logged_model_id(mv: Any) -> str | None:
    """The LoggedModel (`m-...`) behind a model version, to link evaluation metrics to it."""
    if mv.model_id:
        return mv.model_id
    source = mv.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluation_tags(
    report: dict[str, Any],
    data: str | Path,
    run_id: str,
    binary: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The `eval.*` version tags of jobs/evaluate.py; the data is identified by the manifest's
    SHA-256 (not its images), so that `--must-beat` compares runs on the same rows."""
    sav = report["sav"]
    tags = {
        ACCURACY_TAG: repr(sav.accuracy),
        "eval.macro_f1": repr(sav.macro_f1),
        "eval.ece": repr(sav.ece),
        **(
            {"eval.ece_probabilities": repr(sav.ece_probabilities)}
            if sav.ece_probabilities is not None
            else {}
        ),
        **{f"eval.{k}": repr(v) for k, v in (binary or {}).items() if isinstance(v, float)},
        "eval.rows": str(sav.rows),
        "eval.data": str(Path(data).resolve()),
        DATA_TAG: file_sha256(data),
        "eval.run_id": run_id,
        "eval.at": _now(),
    }
    for method, m in report.items():
        if method != "sav":
            tags[f"eval.{method}.accuracy"] = repr(m.accuracy)
    return tags


def set_version_tags(name: str, number: str, tags: dict[str, str], uri: str | None = None) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_model_version_tag(name, number, key, value)


# --- promotion -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasMove:
    name: str
    alias: str
    version: str  # where the alias points now
    previous: str | None  # where it pointed before (None: it did not exist)

    def describe(self) -> str:
        if self.previous == self.version:
            return f"{self.name}@{self.alias} already points to version {self.version}"
        before = f"version {self.previous}" if self.previous else "nothing"
        return f"{self.name}@{self.alias}: {before} -> version {self.version}"


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name and no USER/LOGNAME (e.g. some containers)
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _history(c: Any, name: str, alias: str) -> list[str]:
    """Versions `alias` pointed to before, oldest first (model tag `history.<alias>`)."""
    tag = _registered_model(c, name).tags.get(f"history.{alias}", "[]")
    return [str(v) for v in json.loads(tag)]


def _accuracy(mv: Any, alias: str) -> float:
    value = mv.tags.get(ACCURACY_TAG)
    if value is None:
        raise PromotionRefused(
            f"{mv.name}@{alias} (version {mv.version}) has no {ACCURACY_TAG} tag: evaluate it "
            f"first with jobs/evaluate.py --model models:/{mv.name}@{alias} --data MANIFEST"
        )
    return float(value)


def _record_move(c: Any, move: AliasMove, how: str, history: list[str]) -> None:
    who, when = _who(), _now()
    c.set_registered_model_tag(move.name, f"history.{move.alias}", json.dumps(history))
    for key, value in (("by", who), ("at", when), ("how", how)):
        c.set_registered_model_tag(move.name, f"moved.{move.alias}.{key}", value)
    c.set_model_version_tag(move.name, move.version, f"{move.alias}.since", when)
    c.set_model_version_tag(move.name, move.version, f"{move.alias}.by", who)


def promote(
    name: str,
    source: str = CANDIDATE,
    target: str = "production",
    *,
    min_accuracy: float | None = None,
    must_beat: str | None = None,
    uri: str | None = None,
) -> AliasMove:
    """Point `target` at the version `source` points to, if the gates allow it.

    Gates read the `eval.accuracy` tags written by jobs/evaluate.py: `min_accuracy` refuses a
    lower accuracy; `must_beat` (an alias) refuses unless the accuracy is strictly higher than
    that version's, measured on the same data. Who and when go into tags; the version `target`
    pointed to before is pushed on the model tag `history.<target>` for `rollback`.
    """
    c = client(uri)
    candidate = _alias_version(c, name, source)
    if candidate is None:
        raise RegistryError(
            f"models:/{name}@{source} does not exist: register a version with "
            f"jobs/fit.py --register {name} (it gets the alias {CANDIDATE!r})"
        )
    current = _alias_version(c, name, target)
    number = str(candidate.version)
    before = None if current is None else str(current.version)
    if before == number:
        return AliasMove(name, target, number, before)
    if min_accuracy is not None:
        accuracy = _accuracy(candidate, source)
        if accuracy < min_accuracy:
            raise PromotionRefused(
                f"{name}@{source} (version {candidate.version}) has accuracy {accuracy:.4f}, "
                f"below --min-accuracy {min_accuracy}"
            )
    if must_beat:
        rival = _alias_version(c, name, must_beat)
        if rival is not None and str(rival.version) != number:
            accuracy, rival_accuracy = _accuracy(candidate, source), _accuracy(rival, must_beat)
            data, rival_data = candidate.tags.get(DATA_TAG), rival.tags.get(DATA_TAG)
            if data != rival_data:
                raise PromotionRefused(
                    f"{name}@{source} and {name}@{must_beat} were evaluated on different data "
                    f"({candidate.tags.get('eval.data')} and {rival.tags.get('eval.data')}); "
                    "evaluate both on the same manifest"
                )
            if not accuracy > rival_accuracy:
                raise PromotionRefused(
                    f"{name}@{source} (version {candidate.version}, accuracy {accuracy:.4f}) "
                    f"does not beat {name}@{must_beat} (version {rival.version}, accuracy "
                    f"{rival_accuracy:.4f})"
                )
    history = _history(c, name, target) + ([before] if before is not None else [])
    c.set_registered_model_alias(name, target, number)
    move = AliasMove(name, target, number, before)
    _record_move(c, move, f"promote from {source}", history)
    return move


def rollback(name: str, target: str = "production", *, uri: str | None = None) -> AliasMove:
    """Point `target` back at the version it had before the last promotion."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    history = _history(c, name, target)
    if not history:
        raise RegistryError(
            f"{name}@{target}: no earlier version is recorded (model tag history.{target}); "
            "nothing to roll back to"
        )
    previous = history.pop()
    current = _alias_version(c, name, target)
    try:
        c.get_model_version(name, previous)
    except MlflowException as e:
        if not _missing(e):
            raise
        raise RegistryError(
            f"{name}@{target}: the version before, {previous}, was deleted; promote another "
            "version instead"
        ) from None
    c.set_registered_model_alias(name, target, previous)
    move = AliasMove(name, target, previous, None if current is None else str(current.version))
    _record_move(c, move, "rollback", history)
    return move
