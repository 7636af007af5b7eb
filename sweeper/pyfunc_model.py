"""The MLflow pyfunc of a saved trial model: review texts (or the study's prompts) in, label and score out.

Logged by sweeper/mlflow_model.py as a model from code: MLflow copies this file into each logged
model and runs it when the model is loaded, with the model's own copy of `trainer/` first on
the path and the Hugging Face folder as the artifact `hf_model`. The JAX model runs inside;
nothing here needs torch.

    mlflow.pyfunc.load_model("runs:/<run id>/model").predict({"text": ["a gorgeous film"]})
    # -> DataFrame: label ("Positive" / "Negative"), score (its probability between the two)
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

INPUT_COLUMNS = ("text", "prefix_text")


def _cells(value, count: int) -> list:
    """One cell as `count` inputs: a list of strings as it is, a string or a missing value repeated."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [v if isinstance(v, str) else None for v in value]
    return [value if isinstance(value, str) else None] * count


def _inputs(frame: pd.DataFrame) -> tuple[list, list]:
    """(reviews, prompts), one entry per input; a row may hold lists (`predict({"text": [...]})` gives one)."""
    reviews, prompts = [], []
    for index, row in frame.iterrows():
        text, prefix = row.get("text"), row.get("prefix_text")
        count = max((len(v) for v in (text, prefix) if isinstance(v, (list, tuple, np.ndarray))), default=1)
        row_reviews, row_prompts = _cells(text, count), _cells(prefix, count)
        if len(row_reviews) != len(row_prompts):
            raise ValueError(f"row {index}: {len(row_reviews)} texts but {len(row_prompts)} prefix_texts; send lists "
                             "of equal length, or one of the two columns")
        reviews += row_reviews
        prompts += row_prompts
    return reviews, prompts


class SentimentModel(PythonModel):
    def load_context(self, context) -> None:
        from trainer.predict import SentimentPredictor

        self.predictor = SentimentPredictor(context.artifacts["hf_model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if not any(name in frame.columns for name in INPUT_COLUMNS):
            raise ValueError(
                f"the input has columns {list(frame.columns)}; send `text` (reviews) or `prefix_text` "
                "(the study's prompts), e.g. {\"inputs\": {\"text\": [\"a gorgeous film\"]}}"
            )
        predictions = self.predictor.predict(*_inputs(frame))
        return pd.DataFrame({"label": [p.label for p in predictions], "score": [p.score for p in predictions]})


mlflow.models.set_model(SentimentModel())
