"""Label reviews with a saved model (a folder trainer/export.py wrote): what the MLflow pyfunc serves.

Labels come from scoring, as `eval.mode=score` evaluates: each label's log-likelihood after the
prompt (with or without EOS, as the trial was evaluated), the larger one wins, and the score is
its probability between the two. Inputs are review texts (formatted into the study's prompt) or
the study's `prefix_text` prompts themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from flax import nnx

from trainer.data import LABEL_NAMES, prompt_text
from trainer.packing import answer_ids
from trainer.evaluate import score_candidates
from trainer.export import read_metadata

PROMPT_CUE = prompt_text("")[len("[Text]: "):]  # "\n[Sentiment]:", what every study prompt ends with


@dataclass
class Prediction:
    label: str
    score: float  # the label's probability between the two labels
    log_likelihoods: dict[str, float]


class SentimentPredictor:
    """A saved model and its tokenizer, loaded once; `predict` labels any number of inputs."""

    def __init__(self, folder: str | Path, batch_size: Optional[int] = None) -> None:
        from trainer.checkpoint import load_llama
        from trainer.config import ModelConfig
        from trainer.tokenizer import from_file

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.folder} holds no config.json; pass the folder a trial saved (train.save_model), "
                f"e.g. outputs/<date>/<time>/model"
            )
        self.metadata = read_metadata(self.folder)
        trial_model = self.metadata.get("trial", {}).get("model", {})
        dtypes = {key: trial_model[key] for key in ("dtype", "param_dtype") if key in trial_model}
        model = load_llama(self.folder, ModelConfig(**dtypes))
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        tokenizer_file = next((self.folder / name for name in ("tokenizer.model", "tokenizer.json")
                               if (self.folder / name).is_file()), None)
        if tokenizer_file is None:
            raise FileNotFoundError(f"{self.folder} has neither tokenizer.model nor tokenizer.json")
        self.tokenizer = from_file(tokenizer_file)
        evaluation = self.metadata.get("eval", {})
        self.score_eos = bool(evaluation.get("score_eos", True))
        self.batch_size = batch_size or int(evaluation.get("batch_size", 32))
        self.candidates = [np.asarray(answer_ids(self.tokenizer, label), np.int32) for label in range(len(LABEL_NAMES))]

    def prompt_ids(self, prompt: str) -> np.ndarray:
        start = [self.tokenizer.bos_id] if self.tokenizer.add_bos else []
        return np.asarray([*start, *self.tokenizer.encode(prompt)], np.int32)

    def predict(self, reviews: Sequence[Optional[str]] = (), prompts: Sequence[Optional[str]] = ()) -> list[Prediction]:
        """One prediction per row: row i is reviews[i] as a review, else prompts[i] as a whole prompt."""
        rows = max(len(reviews), len(prompts))
        texts = []
        for i in range(rows):
            review = reviews[i] if i < len(reviews) else None
            prompt = prompts[i] if i < len(prompts) else None
            if isinstance(review, str):
                texts.append(prompt_text(review))
            elif isinstance(prompt, str):
                if not prompt.rstrip(" ").endswith(PROMPT_CUE):
                    raise ValueError(
                        f"row {i}: prefix_text {prompt[-40:]!r} does not end with {PROMPT_CUE!r} as the study's "
                        f"prompts do ('[Text]: <review>\\n[Sentiment]:'); send the review alone as text instead"
                    )
                texts.append(prompt.rstrip(" "))
            else:
                raise ValueError(f"row {i} has neither text (a review) nor prefix_text (a prompt); send one of them")
        if not texts:
            return []
        # Padded batches of a power of two up to batch_size: a few compiled shapes, little padding.
        batch = min(self.batch_size, 1 << max(3, (len(texts) - 1).bit_length()))
        scores = score_candidates(
            self.graphdef, self.params, [self.prompt_ids(t) for t in texts], self.candidates,
            self.tokenizer.eos_id if self.score_eos else None, batch,
        )
        probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        best = np.argmax(scores, axis=1)
        return [
            Prediction(LABEL_NAMES[b], float(p[b]), {name: float(s) for name, s in zip(LABEL_NAMES, row)})
            for b, p, row in zip(best, probabilities, scores)
        ]
