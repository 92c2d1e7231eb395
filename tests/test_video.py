"""Video input: the frames used are the uniform sample of an independent decode, the limits and
the manifest's video field, a video row's vectors equal those of its frames given as images,
and a fit + predict on Ray that records the video settings and reuses them at inference."""

from __future__ import annotations

import base64
import json

import av
import numpy as np
import pytest
from PIL import Image

from sav_ray.core.errors import ConfigError
from sav_ray.core.manifest import ManifestError, ManifestFields, check_image_files, read_manifest
from sav_ray.core.prompts import Example, PromptConfig
from sav_ray.core.resolution import Preprocessing
from sav_ray.core.video import VideoError, VideoLimits, VideoTooLarge, decode_video, load_video
from sav_ray.fixtures.demo_data import VIDEO_CLASSES, write_gif

LEVEL = 16  # frame t is flat grey at LEVEL * t: its content tells its index


def expected_indices(total: int, n: int) -> list[int]:
    """The documented formula, written independently of sav_ray.core.video: n points evenly spaced
    from the first frame to the last, rounded half up (the middle frame for n == 1)."""
    if n == 1:
        return [(total - 1) // 2]
    return [int(np.floor(x + 0.5)) for x in np.linspace(0, total - 1, n)]


def write_video(path, total: int, container: str, size=(24, 16)) -> None:
    frames = [np.full((size[1], size[0], 3), LEVEL * t, dtype=np.uint8) for t in range(total)]
    if container == "gif":
        write_gif([Image.fromarray(f) for f in frames], path)
        return
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def decode_all(path) -> list[np.ndarray]:
    """Every frame, decoded with PyAV's own probing (not sav_ray.core.video)."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("container", ["gif", "mp4"])
@pytest.mark.parametrize(("total", "n"), [(13, 4), (5, 8), (9, 1), (3, 5)])
def test_the_frames_are_the_uniform_sample_of_an_independent_decode(tmp_path, container, total, n):
    path = tmp_path / f"clip.{container}"
    write_video(path, total, container)
    every = decode_all(path)
    assert len(every) == total
    wanted = expected_indices(total, n)
    frames = load_video(path, n)
    assert len(frames) == n
    for frame, index in zip(frames, wanted, strict=True):
        np.testing.assert_array_equal(np.asarray(frame), every[index])
        # the content says which frame it is (exactly for GIF; mp4 is lossy)
        assert abs(float(np.asarray(frame).mean()) - LEVEL * index) <= (
            0 if container == "gif" else 6
        )


def test_limits_and_bad_data_are_refused_naming_the_video(tmp_path):
    path = tmp_path / "clip.gif"
    write_video(path, 13, "gif")  # 13 frames of 100 ms
    data = path.read_bytes()
    for limits, words in (
        (VideoLimits(max_frames=5), "more than 5 frames"),
        (VideoLimits(max_bytes=len(data) - 1), f"{len(data)} bytes"),
        (VideoLimits(max_seconds=1), "s long"),
        (VideoLimits(max_pixels=100), "pixels per frame"),
    ):
        with pytest.raises(VideoTooLarge, match=words):
            decode_video(data, 4, limits, what="inputs[0].video")
    png = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(VideoError, match=r"^inputs\[0\]\.video: not a video"):
        decode_video(png.read_bytes(), 4, what="inputs[0].video")
    mp4 = tmp_path / "clip.mp4"
    write_video(mp4, 13, "mp4")
    with pytest.raises(VideoError, match="no video stream|cannot be decoded"):
        decode_video(mp4.read_bytes()[:400], 4)
    with pytest.raises(VideoError, match="not found"):
        load_video(tmp_path / "missing.mp4", 4)


def test_the_manifest_video_field_is_checked_naming_row_and_field(tmp_path):
    write_video(tmp_path / "a.gif", 3, "gif")
    manifest = tmp_path / "m.jsonl"

    def read(rows, **fields):
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return read_manifest(manifest, ManifestFields(image=(), **fields))

    table = read(
        [{"question": "q", "label": "x", "video": "a.gif"}, {"question": "q", "label": "y"}]
    )
    assert table["video"].to_pylist() == [str(tmp_path / "a.gif"), None]
    check_image_files(table)
    with pytest.raises(ManifestError, match=r"row 1: field 'clip' holds 'a.txt'.*\.mp4"):
        read([{"question": "q", "label": "x", "clip": "a.txt"}], video="clip")
    with pytest.raises(ManifestError, match="video field 'clip' is not in the manifest"):
        read([{"question": "q", "label": "x", "video": "a.gif"}], video="clip")
    rows = [{"question": "q", "label": "x", "video": "a.gif"}]
    with pytest.raises(ManifestError, match="row 2: video file not found"):
        check_image_files(read([*rows, {"question": "q", "label": "y", "video": "b.mp4"}]))


@pytest.fixture(scope="module")
def demo_lm(demo_model_dir):
    from sav_ray.core.models import load_model

    return load_model(str(demo_model_dir))


def test_a_video_rows_vectors_equal_its_sampled_frames_given_as_images(demo_lm, video_data):
    from sav_ray.core.capture import capture_examples
    from sav_ray.core.model_inputs import video_input

    table = read_manifest(video_data["train"], ManifestFields(image=()))
    path = table["video"].to_pylist()[0]
    n = 4
    every = decode_all(path)
    by_hand = [Image.fromarray(every[i]) for i in expected_indices(len(every), n)]
    photo = Image.new("RGB", (40, 30), (10, 200, 30))
    prep = Preprocessing(video_frames=n)
    assert video_input(demo_lm.processor, prep) == "images"  # no torchvision: no video processor
    video_rows = [
        Example(text="Which way?", images=[], video=load_video(path, n)),
        Example(text="And here?", images=[photo], video=load_video(path, n)),  # mixed row
    ]
    image_rows = [
        Example(text="Which way?", images=by_hand),
        Example(text="And here?", images=by_hand + [photo]),
    ]
    got = capture_examples(demo_lm, video_rows, PromptConfig(), preprocessing=prep)
    want = capture_examples(demo_lm, image_rows, PromptConfig(), preprocessing=prep)
    np.testing.assert_array_equal(got, want)  # [2, layer, head, head_dim]
    with pytest.raises(ConfigError, match="torchvision"):
        capture_examples(
            demo_lm,
            video_rows[:1],
            PromptConfig(),
            preprocessing=Preprocessing(video_input="native"),
        )


@pytest.mark.slow
def test_fit_and_predict_on_ray_record_the_video_settings_and_reuse_them(
    local_ray, demo_model_dir, demo_lm, video_data, tmp_path
):
    from mlflow.pyfunc import PythonModelContext

    from sav_ray.core.artifact import ARTIFACT_FILE, load_artifact, write_artifact
    from sav_ray.core.classify import predict_examples
    from sav_ray.pipelines.config import FitConfig, ModelConfig
    from sav_ray.pipelines.fitting import fit
    from sav_ray.pipelines.predicting import ClassifyRows
    from sav_ray.pipelines.preprocess import object_column, preprocess_rows, rows_of
    from sav_ray.tracking.pyfunc_model import SavModel

    n = 3  # not the default 8: inference must take it from the artifact
    cfg = FitConfig(
        model=str(demo_model_dir),
        train=str(video_data["train"]),
        output=str(tmp_path / "sav"),
        image_field="",
        video_frames=n,
        num_heads=6,
        batch_size=4,
    )
    fitted, stats = fit(cfg)
    assert stats.examples == stats.forward_rows == 8
    write_artifact(fitted, cfg.output)
    recorded = json.loads((tmp_path / "sav" / ARTIFACT_FILE).read_text())["preprocessing"]
    assert (recorded["video_frames"], recorded["video_input"]) == (n, "images")
    artifact = load_artifact(cfg.output)
    assert artifact.preprocessing == Preprocessing(video_frames=n, video_input="images")

    # jobs/predict.py's code (its CPU stage, then its actor's), in this process
    table = read_manifest(video_data["test"], ManifestFields(image=()), require_label=False)
    columns = {k: object_column(v) for k, v in table.to_pydict().items()}
    batch = preprocess_rows(columns, cfg.model, None, artifact.prompt.to_dict(), recorded)
    # the model gets the artifact's n frames: one image grid each
    assert all(len(row["image_grid_thw"]) == n for row in rows_of(batch))
    predicted = ClassifyRows(ModelConfig(model=cfg.model), artifact)(batch)
    records = [json.loads(p) for p in predicted["prediction"]]
    assert list(predicted["true_label"]) == list(VIDEO_CLASSES) * 2
    assert all(r["label"] in VIDEO_CLASSES for r in records)

    # in process (as the server and the MLflow model run it): the same votes from n frames
    paths = table["video"].to_pylist()
    texts = table["text"].to_pylist()
    examples = [
        Example(text=t, images=[], video=load_video(p, n))
        for p, t in zip(paths, texts, strict=True)
    ]
    in_process = predict_examples(demo_lm, artifact, examples)
    assert [p.votes for p in in_process] == [r["votes"] for r in records]

    import pandas as pd

    model = SavModel()
    model.load_context(PythonModelContext(artifacts={"sav": cfg.output}, model_config={}))
    videos = [base64.b64encode(open(p, "rb").read()).decode() for p in paths]
    out = model.predict(None, pd.DataFrame({"text": texts, "video": videos}))
    assert list(out["votes"]) == [r["votes"] for r in records]
