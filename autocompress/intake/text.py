"""Text classifiers from Hugging Face ``transformers``, offline: the one adapter for it.

- ``hf:MODEL_DIR``: a local ``transformers`` model folder (``config.json`` + weights), loaded
  with ``AutoModelForSequenceClassification`` (``local_files_only``: no hub access). It is
  wrapped so that it takes ONE input, the padded token ids, and returns the logits; the
  attention mask is ``ids != pad_token_id``, computed inside the model, so the exported ONNX
  file has a single int64 input as every image model's file has a single float one.
- ``text:FILE.csv`` (or ``.jsonl``), options after ``?``: ``text=`` and ``label=`` name the
  columns (default ``text``, ``label``), ``max_length=`` the padded length (default 64),
  ``tokenizer=`` the folder of the tokenizer (default: the ``hf:`` model's folder). Labels
  are any strings or ints, indexed in sorted order; splits are stratified 80/10/10, seeded.

``transformers`` is an optional extra: ``pip install -e ".[text]"``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autocompress.errors import DataSpecError, ModelSpecError, one_line

HF_PREFIX = "hf:"

DEFAULT_MAX_LENGTH = 64
INSTALL_HINT = 'pip install -e ".[text]" (or pip install transformers)'


class TokenClassifier(nn.Module):
    """A sequence classifier on padded token ids alone: (N, L) int64 -> (N, classes)."""

    input_dtype = torch.int64  # intake.models.zeros_input reads this

    def __init__(self, model: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = int(pad_token_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_token_id).to(torch.int64)
        return self.model(input_ids=input_ids, attention_mask=mask).logits


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ModelSpecError(f"hf: models need transformers: {INSTALL_HINT}") from exc
    transformers.logging.set_verbosity_error()  # load reports go to -v, not the user
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_hf_model(folder: str, num_classes: int | None) -> nn.Module:
    """The folder's sequence classifier, wrapped to take token ids only."""
    if folder.startswith("//"):
        # hf://org/name looks like a Hub address; nothing is downloaded, so say what works
        raise ModelSpecError(f"hf:{folder} is a Hub address, and autocompress does not download "
                             "models; save the model with model.save_pretrained(DIR) and pass "
                             "hf:DIR")
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"hf:{folder} is not a transformers model folder (no config.json "
                             "in it); save one with model.save_pretrained(folder)")
    transformers = _transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        if num_classes is not None and config.num_labels != num_classes:
            # a new classification head for this many classes (the encoder is kept)
            kwargs.update(num_labels=num_classes, ignore_mismatched_sizes=True)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(path), **kwargs)
    except Exception as exc:  # transformers raises many types for a bad folder
        raise ModelSpecError(f"hf:{folder} could not be loaded as a sequence classifier: "
                             f"{one_line(exc, typed=True)}") from exc
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    return TokenClassifier(model.eval(), pad)


def _tokenizer(folder: str) -> Any:
    path = Path(folder).expanduser()
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise DataSpecError(f"no tokenizer could be loaded from {folder}: "
                            f"{one_line(exc, typed=True)}; pass text:FILE?tokenizer=DIR with "
                            "a folder that holds tokenizer files") from exc


def parse_text_spec(rest: str) -> tuple[Path, dict[str, str]]:
    file, _, query = rest.partition("?")
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or key not in ("text", "label", "max_length", "tokenizer"):
            raise DataSpecError(f"text: option {part!r} is unknown; use text=, label=, "
                                "max_length= or tokenizer=")
        options[key] = value
    return Path(file).expanduser(), options


def _read_rows(path: Path, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise DataSpecError(f"text file {path} does not exist; check the text: spec")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
    except (OSError, ValueError, csv.Error) as exc:
        raise DataSpecError(f"text file {path} could not be read: {one_line(exc)}") from exc
    if not rows:
        raise DataSpecError(f"text file {path} has no rows")
    columns = set(rows[0])
    missing = [c for c in (text_col, label_col) if c not in columns]
    if missing:
        raise DataSpecError(f"text file {path} has no column {', '.join(map(repr, missing))} "
                            f"(columns: {', '.join(sorted(map(str, columns)))}); name them "
                            "with text:FILE?text=COLUMN&label=COLUMN")
    return [str(r[text_col]) for r in rows], [str(r[label_col]) for r in rows]


def load_text_tokens(
    rest: str, *, tokenizer: str | None,
) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    """``text:`` data as (token ids (N, L) int64, labels (N,) int64, classes, L); the
    splits are made by ``intake.data_loading`` like every other source's."""
    path, options = parse_text_spec(rest)
    folder = options.get("tokenizer") or tokenizer
    if not folder:
        raise DataSpecError("text: data needs a tokenizer: use --model hf:DIR (its folder's "
                            "tokenizer) or text:FILE?tokenizer=DIR")
    try:
        max_length = int(options.get("max_length", DEFAULT_MAX_LENGTH))
    except ValueError:
        max_length = 0
    if max_length < 2:
        raise DataSpecError(f"max_length {options.get('max_length')!r} must be an integer >= 2")
    texts, labels = _read_rows(path, options.get("text", "text"), options.get("label", "label"))
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataSpecError(f"text file {path} has one label ({classes[0]!r}); classification "
                            "needs at least 2")
    encoded = _tokenizer(folder)(texts, padding="max_length", truncation=True,
                                 max_length=max_length, return_tensors="np")
    x = torch.from_numpy(np.asarray(encoded["input_ids"], dtype=np.int64))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[v] for v in labels], dtype=torch.int64)
    return x, y, classes, max_length
