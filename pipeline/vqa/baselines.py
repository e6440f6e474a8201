"""Text-only baselines of `evaluate_vqa`: the frequency prior and the majority answer.

- prior: the most frequent train answers for the question's text key -- (subject, object)
  for relation questions, the question text otherwise -- then the question type's most
  frequent ones;
- majority: the question type's most frequent train answers (all types' for an unseen type).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa

from pipeline.vqa.scores import TOP_K


def norm_text(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def prior_key(qtype: str, subject: str | None, obj: str | None, question: str | None) -> tuple:
    """What the text-only prior conditions on: (subject, object) or the question text."""
    if qtype == "relation":
        return (qtype, norm_text(subject), norm_text(obj))
    return (qtype, norm_text(question))


def _ranked(counter: Counter) -> list[int]:
    """Labels by count desc, ties by class id (answers.json order = global frequency)."""
    return [a for a, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


class FrequencyPrior:
    """Most frequent train answers per prior key, per question type and overall.

    `train`: columns qtype, subject, object, question and label (class id, -1 when the
    answer is outside the vocabulary), as `pipeline.vqa.data.read_train_answers` gives.
    """

    def __init__(self, train: pa.Table):
        by_key: dict[tuple, Counter] = defaultdict(Counter)
        by_type: dict[str, Counter] = defaultdict(Counter)
        overall: Counter = Counter()
        cols = [
            train.column(c).to_pylist() for c in ("qtype", "subject", "object", "question", "label")
        ]
        for qtype, subj, obj, question, label in zip(*cols):
            if label < 0:
                continue
            by_key[prior_key(qtype, subj, obj, question)][label] += 1
            by_type[qtype][label] += 1
            overall[label] += 1
        self.by_key = {k: _ranked(c) for k, c in by_key.items()}
        self.by_type = {k: _ranked(c) for k, c in by_type.items()}
        self.overall = _ranked(overall)

    def majority(self, qtype: str, k: int = TOP_K) -> list[int]:
        return self.by_type.get(qtype, self.overall)[:k]

    def prior(self, qtype: str, subject, obj, question, k: int = TOP_K) -> list[int]:
        ranked = list(self.by_key.get(prior_key(qtype, subject, obj, question), []))[:k]
        for label in self.by_type.get(qtype, self.overall):
            if len(ranked) >= k:
                break
            if label not in ranked:
                ranked.append(label)
        return ranked
