"""`clipda ask IMAGE QUESTION`: answer one question with the trained head and zero-shot CLIP.

The image (cropped to `--box` when given, padded to a square with the CLIP's mean colour
as embed pads its box crops) and the question are embedded with the CLIP
checkpoint the head was trained on (recorded in models/vqa/config.json, or `--clip`),
decoded and preprocessed exactly as the embed stage does. Relation questions ("What is
the relationship between X and Y?") also give the zero-shot ranking with the prompt
template filled with X and Y; object questions ("What is this?") use the object template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.clip.backbone import embed_image
from pipeline.errors import UserError
from pipeline.vqa.zeroshot import TEMPLATES, template_for

RELATION_RE = re.compile(
    r"^\s*what\s+is\s+the\s+relation(?:ship)?\s+between\s+(?:the\s+|a\s+|an\s+)?(.+?)"
    r"\s+and\s+(?:the\s+|a\s+|an\s+)?(.+?)\s*\??\s*$",
    re.IGNORECASE,
)
OBJECT_RE = re.compile(r"^\s*what\s+is\s+(?:this|that|it)(?:\s+object)?\s*\??\s*$", re.IGNORECASE)


@dataclass
class ParsedQuestion:
    qtype: str
    text: str  # the question as the training data words it
    subject: str | None = None
    object: str | None = None


def _name(text: str) -> str:
    return " ".join(text.lower().split())


def parse_question(question: str, qtypes: list[str] | None = None) -> ParsedQuestion:
    """Relation / object question in prepare_vqa's wording; UserError when unusable.

    A model trained on a generic QA table with exactly one other question type takes any
    other question as that type, verbatim.
    """
    m = RELATION_RE.match(question)
    if m:
        subj, obj = _name(m.group(1)), _name(m.group(2))
        return ParsedQuestion(
            "relation", f"What is the relationship between {subj} and {obj}?", subj, obj
        )
    if OBJECT_RE.match(question):
        return ParsedQuestion("object", "What is this?")
    others = [q for q in (qtypes or []) if q not in ("relation", "object")]
    if len(others) == 1 and question.strip():
        return ParsedQuestion(others[0], question.strip())
    raise UserError(
        f"cannot use the question {question!r}: ask 'What is the relationship between X "
        "and Y?' or 'What is this?' (with --box)"
    )


def parse_box(text: str | None) -> tuple[int, int, int, int] | None:
    """'x,y,w,h' -> ints; UserError when malformed."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        box = tuple(round(float(p)) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or box[2] <= 0 or box[3] <= 0 or box[0] < 0 or box[1] < 0:
        raise UserError(f"--box must be x,y,w,h with w, h > 0 (pixels), got {text!r}")
    return box  # type: ignore[return-value]


@dataclass
class AskResult:
    question: ParsedQuestion
    model: list[tuple[str, float]]
    zeroshot: list[tuple[str, float]] = field(default_factory=list)
    template: str | None = None
    clip: str = ""


def ask(
    image: str | Path,
    question: str,
    model_dir: str | Path = "models/vqa",
    clip: str | None = None,
    box: tuple[int, int, int, int] | None = None,
    top: int = 5,
    templates: dict[str, str] = TEMPLATES,
    device: str = "auto",
) -> AskResult:
    """Top answers of the trained head (with its probability among the candidates, or the
    cosine for a cosine-loss head) and of zero-shot CLIP (image-prompt cosines).

    `templates`: the zero-shot prompts per question type, as `evaluate_vqa`'s settings
    hold them (checked, with a `default`). CLIP runs on `device`, the small head on the CPU.
    """
    from pipeline.clip.backbone import load_backbone
    from pipeline.nn.vqa_head import load_head
    from pipeline.vqa.scores import head_scores, topk_rows

    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    head, answer_emb, cfg = load_head(model_dir)
    candidates = cfg.get("qtype_candidates") or {}
    parsed = parse_question(question, list(candidates))
    checkpoint = clip or cfg.get("clip")
    if not checkpoint:
        raise UserError(f"{model_dir}/config.json names no CLIP checkpoint: pass --clip")
    backbone = load_backbone(str(checkpoint), device)
    want = cfg.get("clip_revision")
    if want and backbone.revision != want:
        raise UserError(
            f"CLIP {checkpoint} (revision {backbone.revision}) is not the checkpoint "
            f"the model was trained with (revision {want})"
        )
    image_emb = embed_image(backbone, image, box)
    question_emb = backbone.encode_texts([parsed.text])
    answers: list[str] = cfg["answers"]
    cand = np.asarray(candidates.get(parsed.qtype, range(len(answers))), dtype=np.int64)
    scores = head_scores(head, image_emb, question_emb, answer_emb, torch.from_numpy(cand))
    order, vals = topk_rows(scores.numpy(), top)
    result = AskResult(
        parsed,
        [(answers[cand[i]], float(v)) for i, v in zip(order[0], vals[0])],
        clip=backbone.model_id,
    )
    template = template_for(templates, parsed.qtype)
    fill = {"subject": parsed.subject or "", "object": parsed.object or "", "question": parsed.text}
    prompts = [template.format(answer=answers[c], **fill) for c in cand]
    prompt_emb = backbone.encode_texts(prompts)
    order, vals = topk_rows((image_emb @ prompt_emb.T).numpy(), top)
    result.zeroshot = [(answers[cand[i]], float(v)) for i, v in zip(order[0], vals[0])]
    result.template = template
    return result


def format_result(result: AskResult, model_dir: str | Path) -> str:
    """Human-readable ranking of both methods."""
    width = max([len(a) for a, _ in result.model + result.zeroshot] + [6])
    lines = [
        f"question: {result.question.text} ({result.question.qtype})",
        f"VQA head ({model_dir}):",
    ]
    lines += [f"  {i}. {a:<{width}}  {s:.4f}" for i, (a, s) in enumerate(result.model, 1)]
    lines.append(f"zero-shot CLIP ({result.template!r}):")
    lines += [f"  {i}. {a:<{width}}  {s:.4f}" for i, (a, s) in enumerate(result.zeroshot, 1)]
    return "\n".join(lines)
