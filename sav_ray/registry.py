"""MLflow adapter: where artifacts come from and go to.

`load_artifact_ref` accepts an artifact folder or a registry URI (`models:/NAME@ALIAS`,
`models:/NAME/VERSION`) and always ends in the project's one loader, `load_artifact`.
"""

from __future__ import annotations

from pathlib import Path

from sav_ray.artifact import BaseModelInfo, SavArtifact, load_artifact

SAV_SUBDIR = "sav"  # where the SAV artifact sits inside a logged MLflow model


def download_artifact(ref: str) -> Path:
    """The local folder of the SAV artifact behind `ref` (downloaded for registry URIs)."""
    if not ref.startswith("models:/"):
        return Path(ref)
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
    return local / "artifacts" / SAV_SUBDIR


def load_artifact_ref(ref: str, expect: BaseModelInfo | None = None) -> SavArtifact:
    return load_artifact(download_artifact(ref), expect=expect)
