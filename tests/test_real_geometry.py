"""Capture, fit and predict at the decoder geometry of real checkpoints (sav_ray.fixtures.geometries):
random models at the real width, heads and head_dim, 1 decoder layer, a small MLP width.

Slow: four ~40-100 MB models and a fit and predict on Ray for each: one Ray for the module,
each model built and loaded once, two classes of two rows (one to predict), one batch each, so
the time goes to what is proved, not to rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from sav_ray.core import reduce
from sav_ray.core.artifact import load_artifact, write_artifact
from sav_ray.core.capture import capture_examples
from sav_ray.core.classify import predict_examples
from sav_ray.core.errors import ConfigError
from sav_ray.core.manifest import read_manifest
from sav_ray.core.models import load_model
from sav_ray.core.prompts import PromptConfig, encode
from sav_ray.fixtures.geometries import GEOMETRIES, build_geometry_model, geometry
from sav_ray.pipelines.config import FitConfig, ModelConfig
from sav_ray.pipelines.fitting import fit
from sav_ray.pipelines.predicting import predict_table

pytestmark = pytest.mark.slow

NAMES = list(GEOMETRIES)
INTERMEDIATE = 256  # the MLP is not what is tested; the real one is 10-19k wide


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """{"train": manifest, "test": manifest}: 2 classes, 2 training rows and 1 test row each."""
    from sav_ray.fixtures.demo_data import make_dataset

    folder = tmp_path_factory.mktemp("two_classes")
    return make_dataset(folder, classes=2, train_per_class=2, test_per_class=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (model folder, LoadedModel), built once per module."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            out = build_geometry_model(
                name, tmp_path_factory.mktemp(name), layers=1, intermediate_size=INTERMEDIATE
            )
            cache[name] = (out, load_model(str(out)))  # float32 on CPU: bf16 weights, exactly
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_model_has_the_real_head_geometry_and_is_saved_in_bfloat16(built, name):
    folder, lm = built(name)
    geo = geometry(name)
    text = lm.model.config.get_text_config()
    assert (text.hidden_size, text.num_key_value_heads) == (geo.hidden_size, geo.num_kv_heads)
    assert (lm.info.num_layers, lm.info.num_heads, lm.info.head_dim) == (
        1,
        geo.num_heads,
        geo.head_dim,
    )
    assert text.intermediate_size == INTERMEDIATE
    params = sum(p.numel() for p in lm.model.parameters())
    on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert 2 * params <= on_disk < 2 * params + 2**20  # two bytes a weight, plus the header


def test_unknown_name_and_too_many_layers_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="qwen2-vl-7b"):
        build_geometry_model("qwen9-vl", tmp_path)
    with pytest.raises(ConfigError, match="--layers 99"):
        build_geometry_model("Qwen/Qwen2-VL-7B-Instruct", tmp_path, layers=99)


@pytest.mark.parametrize("name", NAMES)
def test_o_proj_of_captured_vector_equals_o_proj_output(
    built, name, manifest_examples, two_classes, o_proj_identity
):
    _, lm = built(name)
    examples, _ = manifest_examples(two_classes["train"])
    vectors = o_proj_identity(lm, dict(encode(lm.processor, examples[:2], PromptConfig())))
    assert vectors.shape[2:] == (geometry(name).num_heads, geometry(name).head_dim)


@pytest.mark.parametrize("name", NAMES)
def test_fit_on_ray_and_predict_round_trip(
    built, name, local_ray, two_classes, manifest_examples, tmp_path
):
    folder, lm = built(name)
    examples, labels_of_rows = manifest_examples(two_classes["train"])
    test_examples, _ = manifest_examples(two_classes["test"])
    cfg = FitConfig(
        model=str(folder),
        train=str(two_classes["train"]),
        output="x",
        num_heads=4,
        batch_size=len(examples),  # one batch: one actor call
    )
    artifact, stats = fit(cfg)
    assert stats.forward_rows == stats.examples == len(examples)
    write_artifact(artifact, tmp_path / "sav")
    written = load_artifact(tmp_path / "sav", expect=lm.info)

    # The fit's centroids are those of a capture of the same rows in this process.
    y = np.array([written.labels.index(label) for label in labels_of_rows])  # [n]
    vectors = capture_examples(lm, examples, PromptConfig())  # [n, layer, head, head_dim]
    sums = reduce.ClassSums.from_batch(written.labels, vectors, y)
    np.testing.assert_allclose(written.centroids, sums.centroids(written.heads), atol=1e-5, rtol=0)

    # Predict on Ray gives what the artifact gives in this process.
    table = read_manifest(two_classes["test"], require_label=False)
    records = predict_table(
        table, ModelConfig(model=str(folder), batch_size=len(test_examples)), written
    )
    expected = predict_examples(lm, written, test_examples)
    assert [r["label"] for r in records] == [p.label for p in expected]
    assert [r["votes"] for r in records] == [p.votes for p in expected]
