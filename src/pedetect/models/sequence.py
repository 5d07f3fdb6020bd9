"""Stage 2: a sequence head over one series' ordered slice embeddings (docs/design.md, "Data flow").

Input: (B, T, D) embeddings in position order with a (B, T) mask of real slices; series shorter
than T are padded. Output: one logit per slice and the nine exam logits. Padded positions never
reach a pooled exam feature or the loss: recurrent encoders run on packed sequences, the
transformer masks them as keys, pooling masks them, and :func:`metric_loss` takes real slices only.

Long series can instead be resized to a fixed length and the slice logits resized back (1st place).

For ``predict`` and the bundle::

    head = load_sequence_head(model_dir, fold)                # MODEL_DIR/seq/fold<k>/model.safetensors
    slice_logits, exam_logits = predict_series(head, embeddings, cnn_logits)   # one series, numpy
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pedetect.labels import CHRONICITY_LABELS, EXAM_LABELS, LOCATION_LABELS
from pedetect.metric.loss import LossParts, weighted_log_loss_parts
from pedetect.models.layout import WEIGHTS_FILE, read_model_config, seq_dir
from pedetect.models.weights import load_weights, save_weights

if TYPE_CHECKING:
    from pedetect.recipe import ExperimentConfig, SeqConfig

Encoder = Literal["gru", "lstm", "transformer", "double_lstm"]
ExamStructure = Literal["independent", "conditional"]
ExamPooling = Literal["shared", "per_output"]


def neighbour_differences(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[f, f − f_prev, f − f_next] per slice (1st place); at either end of a series the missing
    neighbour is the slice itself, so its difference is 0 and padding never leaks in."""
    lengths = mask.sum(1)
    index = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
    prev_index = (index - 1).clamp(min=0)
    next_index = torch.minimum(index + 1, (lengths - 1).clamp(min=0).unsqueeze(1))
    gather = lambda idx: torch.gather(features, 1, idx.unsqueeze(-1).expand_as(features))  # noqa: E731
    return torch.cat([features, features - gather(prev_index), features - gather(next_index)], dim=-1)


# The conditional exam head's outputs (exam_structure "conditional"): whether the exam is positive,
# whether a non-positive exam is indeterminate, and the labels that only a positive exam can carry,
# given that it is positive (one logit for both RV/LV labels: exactly one of them holds).
_GIVEN_POSITIVE = (*LOCATION_LABELS, *CHRONICITY_LABELS)  # each its own p(label | positive)
CONDITIONAL_OUTPUTS: tuple[str, ...] = (
    "positive",
    "indeterminate_if_not_positive",
    "rv_lv_ratio_gte_1_if_positive",
    *(f"{label}_if_positive" for label in _GIVEN_POSITIVE),
)
_LOG_P_MAX = -1e-6  # keeps logit(p) finite (about 13.8) where p rounds to 1


def _log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012). Near 0, 1 − exp(x) is
    −2 exp(x/2) sinh(x/2): as accurate as expm1 and, unlike it, an ONNX operator (the export)."""
    near_zero = math.log(2.0) + log_p / 2 + torch.log(-torch.sinh(log_p / 2))
    return torch.where(log_p > -math.log(2.0), near_zero, torch.log1p(-torch.exp(log_p)))


def conditional_exam_logits(outputs: torch.Tensor) -> torch.Tensor:
    """Exam logits ``(B, 9)`` (EXAM_LABELS order) from the conditional head's ``(B, 8)`` outputs.

    p(negative) = (1 − p₊)(1 − p_ind), p(indeterminate) = (1 − p₊) p_ind, p(label) = p₊ p(label | +)
    for the seven labels of positive exams, p(rv_lv < 1) = p₊ (1 − p(rv_lv ≥ 1 | +)). The nine
    probabilities then follow the label rules' structure by construction, and each conditional
    output learns from the positive exams alone (a negative exam's 0 for central_pe says nothing
    about where emboli sit). Computed in log space, so the logits stay exact in the tails.
    """
    log_sig = F.logsigmoid
    z = {name: outputs[:, i] for i, name in enumerate(CONDITIONAL_OUTPUTS)}
    positive, not_positive = log_sig(z["positive"]), log_sig(-z["positive"])
    log_p = {
        "negative_exam_for_pe": not_positive + log_sig(-z["indeterminate_if_not_positive"]),
        "indeterminate": not_positive + log_sig(z["indeterminate_if_not_positive"]),
        "rv_lv_ratio_gte_1": positive + log_sig(z["rv_lv_ratio_gte_1_if_positive"]),
        "rv_lv_ratio_lt_1": positive + log_sig(-z["rv_lv_ratio_gte_1_if_positive"]),
    }
    for label in _GIVEN_POSITIVE:
        log_p[label] = positive + log_sig(z[f"{label}_if_positive"])
    stacked = torch.stack([log_p[label] for label in EXAM_LABELS], dim=1).clamp(max=_LOG_P_MAX)
    return stacked - _log1mexp(stacked)


def resize_batch(x: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of (B, T, C) to (B, length, C)."""
    return F.interpolate(x.transpose(1, 2), size=length, mode="linear", align_corners=True).transpose(1, 2)


def resize_sequence(x: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of (T, C) to (length, C)."""
    return resize_batch(x.unsqueeze(0), length)[0]


class SinusoidalPosition(nn.Module):
    table: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, dim: int, max_len: int = 4096):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]]


def _check_head_options(
    embedding_dim: int,
    *,
    encoder: str,
    use_cnn_logit: bool,
    exam_structure: str,
    exam_pooling: str,
    input_columns: int | None,
    position: str,
    exam_pool: str,
    attention: str,
    head_hidden: int,
    resize: str,
) -> None:
    """ValueError naming the option when a :class:`SequenceHead`'s options cannot go together."""
    if encoder not in ("gru", "lstm", "double_lstm", "transformer"):
        raise ValueError(f"unknown sequence encoder {encoder!r}; choose gru, lstm, double_lstm or transformer")
    if exam_pool not in ("attention_max", "attention", "mean_max"):
        raise ValueError(f"unknown exam_pool {exam_pool!r}; choose attention_max, attention or mean_max")
    if exam_pooling == "per_output" and (exam_pool != "attention_max" or head_hidden or encoder == "double_lstm"):
        raise ValueError("exam_pooling per_output needs exam_pool attention_max, head_hidden 0 and a single encoder")
    if attention not in ("linear", "tanh") or position not in ("sinusoidal", "none") or resize not in ("all", "longer"):
        raise ValueError(f"attention {attention!r}, position {position!r} or resize {resize!r} unknown")
    if input_columns is not None and not 0 <= input_columns <= embedding_dim:
        raise ValueError(f"input_columns must be None or 0 … {embedding_dim}, got {input_columns}")
    if input_columns == 0 and not use_cnn_logit:
        raise ValueError("input_columns=0 and use_cnn_logit=False leave the head no input")
    if exam_structure not in ("independent", "conditional"):
        raise ValueError(f"unknown exam_structure {exam_structure!r}; choose independent or conditional")
    if exam_pooling not in ("shared", "per_output"):
        raise ValueError(f"unknown exam_pooling {exam_pooling!r}; choose shared or per_output")


class SequenceHead(nn.Module):
    """Bidirectional GRU/LSTM or transformer over slice embeddings; slice and exam logits."""

    encoder: nn.Module  # nn.GRU, nn.LSTM or nn.TransformerEncoder (encoder_kind)

    def __init__(
        self,
        embedding_dim: int,
        *,
        encoder: Encoder = "gru",
        hidden: int = 128,
        layers: int = 2,
        dropout: float = 0.1,
        heads: int = 4,
        neighbour_diffs: bool = False,
        use_cnn_logit: bool = True,
        fixed_length: int | None = None,
        input_dropout: float = 0.0,
        exam_structure: ExamStructure = "independent",
        exam_pooling: ExamPooling = "shared",
        input_columns: int | None = None,
        feedforward: int | None = None,
        position: str = "sinusoidal",
        exam_pool: str = "attention_max",
        attention: str = "linear",
        head_hidden: int = 0,
        resize: str = "all",
    ):
        super().__init__()
        _check_head_options(
            embedding_dim,
            encoder=encoder,
            use_cnn_logit=use_cnn_logit,
            exam_structure=exam_structure,
            exam_pooling=exam_pooling,
            input_columns=input_columns,
            position=position,
            exam_pool=exam_pool,
            attention=attention,
            head_hidden=head_hidden,
            resize=resize,
        )
        self.exam_pool = exam_pool
        self.attention_kind = attention
        self.resize = resize
        self.exam_structure = exam_structure
        self.exam_pooling = exam_pooling
        self.embedding_dim = embedding_dim
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout else nn.Identity()
        self.neighbour_diffs = neighbour_diffs
        self.use_cnn_logit = use_cnn_logit
        self.fixed_length = fixed_length
        # The trailing columns it reads (the location logits, when the features are left out).
        self.input_columns = embedding_dim if input_columns is None else int(input_columns)
        in_dim = self.input_columns * (3 if neighbour_diffs else 1) + (1 if use_cnn_logit else 0)
        self.encoder_kind = encoder
        out_dim = self._build_encoder(in_dim, hidden, layers, dropout, heads, feedforward, position)
        self.dropout = nn.Dropout(dropout)
        self.slice_head = _output(out_dim, 1, head_hidden, dropout)
        n_exam = len(EXAM_LABELS) if exam_structure == "independent" else len(CONDITIONAL_OUTPUTS)
        # shared: one attention over the slices for every exam output; per_output: each output attends
        # to its own slices (the RV/LV outputs to the heart's, positive/negative to the emboli's).
        self.attention = nn.Linear(out_dim, 1 if exam_pooling == "shared" else n_exam)
        if encoder == "double_lstm":  # an attention per LSTM, their pooled vectors summed (4th place)
            self.attention2 = nn.Linear(out_dim, 1)
        pooled_dim = out_dim if exam_pool == "attention" else 2 * out_dim
        self.exam_head = _output(pooled_dim, n_exam, head_hidden, dropout)

    def _build_encoder(
        self, in_dim: int, hidden: int, layers: int, dropout: float, heads: int, feedforward: int | None, position: str
    ) -> int:
        """The encoder of ``self.encoder_kind`` (its modules made in the order their weights were always
        drawn); the width of its outputs."""
        encoder = self.encoder_kind
        if encoder in ("gru", "lstm", "double_lstm"):
            rnn = nn.GRU if encoder == "gru" else nn.LSTM
            self.encoder = rnn(
                in_dim,
                hidden,
                num_layers=layers,
                batch_first=True,
                bidirectional=True,
                dropout=dropout if layers > 1 else 0.0,
            )
            if encoder == "double_lstm":  # the 4th place's second LSTM, on the first one's outputs
                self.encoder2 = nn.LSTM(
                    2 * hidden,
                    hidden,
                    num_layers=layers,
                    batch_first=True,
                    bidirectional=True,
                    dropout=dropout if layers > 1 else 0.0,
                )
            return 2 * hidden
        self.project = nn.Linear(in_dim, hidden)
        self.position = SinusoidalPosition(hidden) if position == "sinusoidal" else nn.Identity()
        layer = nn.TransformerEncoderLayer(hidden, heads, feedforward or 4 * hidden, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        return hidden

    def predict_series(self, embeddings: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slice logits ``(N,)`` and exam logits ``(9,)`` (EXAM_LABELS order), float32, of one series.

        ``embeddings`` ``(N, D)`` and ``logits`` ``(N,)`` as ``embed_volume`` gives them, in position
        order. The head does its own preprocessing (neighbour differences, resizing to a fixed length
        and back), the same code as in training. Runs in eval mode on the head's device. The exported
        head (:class:`pedetect.models.onnx.OnnxSequenceHead`) answers the same call.
        """
        if len(embeddings) == 0:
            raise ValueError("a series without slices has no sequence prediction")
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings are {embeddings.shape[1]} wide; this head takes {self.embedding_dim}")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        with torch.inference_mode():
            emb = torch.as_tensor(np.asarray(embeddings), device=device).float().unsqueeze(0)
            cnn = torch.as_tensor(np.asarray(logits), device=device).float().unsqueeze(0)
            slice_logits, exam_logits = self(emb, None, cnn)
        self.train(was_training)
        return slice_logits[0].float().cpu().numpy(), exam_logits[0].float().cpu().numpy()

    def _encode(self, x: torch.Tensor, mask: torch.Tensor, *, padded: bool) -> list[torch.Tensor]:
        """The encoder's outputs ``(B, T, D)``: one stream, or each LSTM's for double_lstm."""
        if self.encoder_kind == "transformer":
            return [self.encoder(self.position(self.project(x)), src_key_padding_mask=~mask if padded else None)]
        first = _run_rnn(self.encoder, x, mask, padded)
        if self.encoder_kind == "double_lstm":
            return [first, _run_rnn(self.encoder2, first, mask, padded)]
        return [first]

    def _attend(self, layer: nn.Linear, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights over the real slices, ``(B, T, k)``: softmax of a linear (or tanh) score."""
        scores = layer(hidden)
        if self.attention_kind == "tanh":
            scores = torch.tanh(scores)
        return torch.softmax(scores.masked_fill(~mask.unsqueeze(-1), float("-inf")), dim=1)

    def forward(
        self, embeddings: torch.Tensor, mask: torch.Tensor | None = None, cnn_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D), (B, T) bool, optional (B, T) → slice logits (B, T) (0 where padded), exam logits (B, 9).

        ``mask`` None: every position is a real slice (one series, as ``predict`` runs it): the
        recurrent encoder runs unpacked, the path an ONNX export takes.
        """
        padded = mask is not None
        mask = (
            mask.bool()
            if mask is not None
            else torch.ones(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)
        )
        x = self.input_dropout(embeddings[..., embeddings.shape[-1] - self.input_columns :].float())
        if self.neighbour_diffs:
            x = neighbour_differences(x, mask)
        if self.use_cnn_logit:
            if cnn_logits is None:
                raise ValueError("this head was built with use_cnn_logit=True: pass the CNN's slice logits")
            x = torch.cat([x, cnn_logits.float().unsqueeze(-1)], dim=-1)
        if padded:
            x = x * mask.unsqueeze(-1)  # padding carries no values, whatever the caller left there
        if self.fixed_length is None:
            return self._heads(x, mask, padded=padded)
        if self.resize == "longer":
            return self._heads_longer_resized(x, mask, padded=padded)
        return self._heads_resized(x, mask, padded=padded)

    def _heads(self, x: torch.Tensor, mask: torch.Tensor, *, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        streams = [self.dropout(h) for h in self._encode(x, mask, padded=padded)]
        hidden = streams[0] if len(streams) == 1 else streams[0] + streams[1]  # double_lstm: the two LSTMs summed
        slice_logits = self.slice_head(hidden).squeeze(-1).masked_fill(~mask, 0.0)
        weights = self._attend(self.attention, hidden if len(streams) == 1 else streams[0], mask)  # (B, T, 1 or n_exam)
        attended = torch.einsum("btk,btd->bkd", weights, hidden if len(streams) == 1 else streams[0])
        if len(streams) == 2:
            attended = attended + torch.einsum(
                "btk,btd->bkd", self._attend(self.attention2, streams[1], mask), streams[1]
            )
        maxed = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(1).values
        if self.exam_pool == "attention":
            exam_logits = self.exam_head(attended[:, 0])
        elif self.exam_pool == "mean_max":
            real = mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * real).sum(1) / real.sum(1).clamp(min=1)
            exam_logits = self.exam_head(torch.cat([mean, maxed], dim=-1))
        elif self.exam_pooling == "shared":
            exam_logits = self.exam_head(torch.cat([attended[:, 0], maxed], dim=-1))
        else:  # output k reads its own attended vector: row k of the head's weights on [attended_k, maxed]
            pooled = torch.cat([attended, maxed.unsqueeze(1).expand_as(attended)], dim=-1)
            assert isinstance(self.exam_head, nn.Linear)  # per_output needs head_hidden 0: a linear head
            exam_logits = (pooled * self.exam_head.weight).sum(-1) + self.exam_head.bias
        if self.exam_structure == "conditional":
            exam_logits = conditional_exam_logits(exam_logits)
        return slice_logits, exam_logits

    def _heads_longer_resized(
        self, x: torch.Tensor, mask: torch.Tensor, *, padded: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """1st place: series longer than fixed_length resized to it, shorter ones padded and masked;
        the slice logits of resized series resized back."""
        length = self.fixed_length
        assert length is not None  # forward resizes only with a fixed_length
        lengths = mask.sum(1).tolist() if padded else [x.shape[1]] * x.shape[0]
        if max(lengths) <= length:
            return self._heads(x, mask, padded=padded)
        kept = [min(n, length) for n in lengths]
        batch = x.new_zeros((x.shape[0], max(kept), x.shape[2]))
        for b, n in enumerate(lengths):
            batch[b, : kept[b]] = resize_sequence(x[b, :n], length) if n > length else x[b, :n]
        new_mask = torch.arange(batch.shape[1], device=x.device).unsqueeze(0) < torch.tensor(
            kept, device=x.device
        ).unsqueeze(1)
        slice_short, exam_logits = self._heads(batch, new_mask, padded=not all(k == batch.shape[1] for k in kept))
        slice_logits = torch.zeros(mask.shape, dtype=slice_short.dtype, device=x.device)
        for b, n in enumerate(lengths):
            row = slice_short[b, : kept[b]]
            slice_logits[b, :n] = resize_sequence(row.unsqueeze(-1), n).squeeze(-1) if n > length else row
        return slice_logits, exam_logits

    def _heads_resized(self, x: torch.Tensor, mask: torch.Tensor, *, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.fixed_length
        assert length is not None  # forward resizes only with a fixed_length
        full = torch.ones((x.shape[0], length), dtype=torch.bool, device=x.device)
        if not padded:  # every series is T long: resize the batch at once (no per-series lengths to read)
            slice_resized, exam_logits = self._heads(resize_batch(x, length), full, padded=False)
            return resize_batch(slice_resized.unsqueeze(-1), x.shape[1]).squeeze(-1), exam_logits
        lengths = mask.sum(1).tolist()
        resized = torch.stack([resize_sequence(x[b, :n], length) for b, n in enumerate(lengths)])
        slice_resized, exam_logits = self._heads(resized, full, padded=False)
        slice_logits = torch.zeros(mask.shape, dtype=slice_resized.dtype, device=x.device)
        for b, n in enumerate(lengths):
            slice_logits[b, :n] = resize_sequence(slice_resized[b].unsqueeze(-1), n).squeeze(-1)
        return slice_logits, exam_logits


def _output(in_dim: int, out_dim: int, hidden: int, dropout: float) -> nn.Module:
    """A linear output layer, or (``hidden`` > 0, 4th place) a hidden layer, ReLU and dropout before it."""
    if not hidden:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def _run_rnn(rnn: nn.Module, x: torch.Tensor, mask: torch.Tensor, padded: bool) -> torch.Tensor:
    if not padded:  # every position a real slice: nothing to pack (and exportable to ONNX)
        return rnn(x)[0]
    packed = pack_padded_sequence(x, mask.sum(1).cpu(), batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out


def metric_loss_parts(
    slice_logits: torch.Tensor,
    exam_logits: torch.Tensor,
    mask: torch.Tensor,
    slice_targets: torch.Tensor,
    exam_targets: torch.Tensor,
) -> LossParts:
    """The competition metric over a batch of series (one exam each), real slices only."""
    mask = mask.bool()
    exam_index = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    return weighted_log_loss_parts(
        slice_targets[mask].float(),
        slice_logits[mask],
        exam_index,
        exam_targets.float(),
        exam_logits,
        from_logits=True,
    )


def metric_loss(*args) -> torch.Tensor:
    """Training loss = the competition score of the batch; arguments as :func:`metric_loss_parts`."""
    return metric_loss_parts(*args).score


# The seq settings that build a head, each the SequenceHead argument of the same name.
HEAD_SETTINGS = (
    "encoder",
    "hidden",
    "layers",
    "dropout",
    "heads",
    "neighbour_diffs",
    "use_cnn_logit",
    "fixed_length",
    "input_dropout",
    "exam_structure",
    "exam_pooling",
    "feedforward",
    "position",
    "exam_pool",
    "attention",
    "head_hidden",
    "resize",
)


def build_sequence_head(seq: SeqConfig, embedding_dim: int, *, input_columns: int | None = None) -> SequenceHead:
    """The head of a resolved ``seq`` config section over embeddings ``embedding_dim`` wide, reading
    their last ``input_columns`` columns (``ExperimentConfig.seq_input_columns``; None: all)."""
    return SequenceHead(
        embedding_dim, input_columns=input_columns, **{name: getattr(seq, name) for name in HEAD_SETTINGS}
    )


def save_sequence_head(head: SequenceHead, path: str | Path) -> None:
    """The head's tensors as safetensors (atomically), the embedding width in the metadata."""
    save_weights(head, path, kind="pedetect.sequence_head", metadata={"embedding_dim": str(head.embedding_dim)})


def load_sequence_head(
    model_dir: str | Path,
    fold: int,
    *,
    config: ExperimentConfig | None = None,
    device: str | torch.device = "cpu",
) -> SequenceHead:
    """The trained stage-2 head of one fold, in eval mode: built from ``MODEL_DIR/config.yaml`` (or
    ``config``) and loaded from ``MODEL_DIR/seq/fold<k>/model.safetensors``."""
    if config is None:
        config = read_model_config(model_dir)
    path = seq_dir(model_dir, fold) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained sequence head for fold {fold}: {path} is missing (run pedetect train --stage seq)"
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "embedding_dim" not in metadata:
        raise ValueError(f"{path} is not a pedetect sequence head (no embedding_dim in its metadata)")
    head = build_sequence_head(config.seq, int(metadata["embedding_dim"]), input_columns=config.seq_input_columns)
    return load_weights(head, path).eval().to(device)


def predict_series(head: SequenceHead, embeddings: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slice logits ``(N,)`` and exam logits ``(9,)`` (EXAM_LABELS order), float32, of one series:
    :meth:`SequenceHead.predict_series`."""
    return head.predict_series(embeddings, logits)
