"""The MLflow model of a SAV artifact: a pyfunc logged from code, so loading it unpickles nothing.

`sav_ray.tracking.registry.register_artifact` logs this file as `python_model` with the SAV artifact
folder as the MLflow artifact `sav`. MLflow copies the file into the model and runs it on load:
it defines `SavModel` and hands an instance to `mlflow.models.set_model`. `load_context` loads
the SAV through `load_artifact` (schema and hashes checked) and the base model from the
artifact's recorded `name_or_path` and `revision`.

sav-ray need not be installed where it loads: the model carries the package's source as its
`code_paths` (code/sav_ray), and MLflow puts code/ first on `sys.path` before it runs this file,
so a fresh process (`mlflow models serve/predict`, `spark_udf`) imports the logged copy. A process
that imported sav_ray already keeps that one. Only the core is imported here (no Ray, no Serve);
the environment is the model's requirements.txt (`registry.pip_requirements`).

Input: a pandas DataFrame, one row per example
    text   str            the row's text (what the prompt's {text} becomes)
    image  str, optional  one image as the base64 of its encoded file (PNG, JPEG, WEBP, GIF,
                          BMP, TIFF), decoded within the core's image limits; null or ""
                          for a text-only row (a text LLM base model takes no image: an
                          image there is an error naming the row)
    video  str, optional  one video as the base64 of its file (mp4, webm, mov, mkv, avi, gif):
                          the artifact's `video_frames` sampled uniformly (sav_ray.core.video), given
                          to the processor as the fit gave them; null or "" for none
Output: a pandas DataFrame, one row per input row, in order
    label   str               the predicted label
    votes   dict[str, int]    heads voting for each label (they sum to k)
    scores  dict[str, float]  votes / k
    probabilities  dict[str, float]  per label, summing to 1 (artifacts fitted with sav-ray's
                   probabilities, schema_version 4; absent for older ones)
    decision  bool  p(positive label) >= the artifact's threshold (only where it has one)
These are `sav_ray.core.classify.predict_examples`'s, the same as jobs/predict.py's: inputs are
processed with the artifact's prompt and image resolution (its `preprocessing`).

Options at load, `mlflow.pyfunc.load_model(uri, model_config={...})`:
    base_model  another location of the same base model (a local mirror; geometry and
                revision are checked against the artifact)
    dtype       "auto" (default: bfloat16 on GPU, float32 on CPU), "float32", "bfloat16"
    batch_size  rows per forward pass (default 8)

    model = mlflow.pyfunc.load_model("models:/pets@production")
    model.predict(pd.DataFrame({"text": ["What is it?"], "image": [base64.b64encode(png).decode()]}))
"""

import base64
import binascii

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class SavModel(PythonModel):
    def load_context(self, context):
        from sav_ray.core.artifact import load_artifact
        from sav_ray.core.models import load_model

        config = context.model_config or {}
        self.artifact = load_artifact(context.artifacts["sav"])
        base = self.artifact.base_model
        self.lm = load_model(
            config.get("base_model") or base.name_or_path,
            base.revision,
            dtype=config.get("dtype", "auto"),
        )
        base.check_compatible(self.lm.info)
        self.batch_size = int(config.get("batch_size", 8))

    # pd.DataFrame: MLflow validates with the logged signature instead of inferring one.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from sav_ray.core.classify import predict_examples
        from sav_ray.core.images import ImageError, decode_image
        from sav_ray.core.prompts import Example
        from sav_ray.core.video import decode_video

        frame = pd.DataFrame(model_input)
        if "text" not in frame.columns:
            raise ValueError(
                f"the input has columns {list(frame.columns)} but no 'text'; give a DataFrame "
                "with a 'text' column and optionally an 'image' column (base64 image files)"
            )
        images = frame["image"] if "image" in frame.columns else [None] * len(frame)
        videos = frame["video"] if "video" in frame.columns else [None] * len(frame)
        n_frames = self.artifact.preprocessing.video_frames
        examples = []
        for i, (text, image, video) in enumerate(zip(frame["text"], images, videos, strict=True)):
            where = f"input row {i}"
            pixels = []
            for field, given in (("image", image), ("video", video)):
                if isinstance(given, str) and given and not self.lm.info.takes_images:
                    raise ImageError(
                        f"{where}: field {field!r}: {self.lm.info.text_only_reason}; leave it "
                        "empty (null or '') or drop the column"
                    )
            if isinstance(image, str) and image:
                data = _base64(image, f"{where}: field 'image'", ImageError)
                pixels.append(decode_image(data, what=f"{where} field 'image'"))
            frames = []
            if isinstance(video, str) and video:
                data = _base64(video, f"{where}: field 'video'", ValueError)
                frames = decode_video(data, n_frames, what=f"{where} field 'video'")
            text = "" if text is None else str(text)
            examples.append(Example(text=text, images=pixels, where=where, video=frames))
        preds = []
        for start in range(0, len(examples), self.batch_size):
            preds += predict_examples(
                self.lm, self.artifact, examples[start : start + self.batch_size]
            )
        out = {
            "label": [p.label for p in preds],
            "votes": [p.votes for p in preds],
            "scores": [p.scores for p in preds],
        }
        if self.artifact.calibration is not None:
            out["probabilities"] = [p.probabilities for p in preds]
        if self.artifact.threshold is not None:
            out["decision"] = [p.decision for p in preds]
        return pd.DataFrame(out)


def _base64(value: str, what: str, error: type[ValueError]) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as e:
        raise error(
            f"{what} is not base64 ({e}); send base64.b64encode(open(path, 'rb').read()).decode()"
        ) from None


mlflow.models.set_model(SavModel())
