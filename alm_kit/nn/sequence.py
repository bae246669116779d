"""Turn per-example lists of pieces (text ids or audio tokens) into padded decoder inputs.

Layouts describe an example as pieces (so does the inference engine's text-only path); padding,
masks, position ids and labels are built here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alm_kit.interfaces import IGNORE, AudioTokens, Decoder, DecoderInputs


@dataclass
class Piece:
    """A run of decoder input positions."""

    embeds: Tensor  # (n, d)
    attend: Tensor  # (n,) bool
    labels: Tensor  # (n,) long; IGNORE where no loss
    #: how many of ``labels`` are not IGNORE, known on the host (the loss then needs no device sync)
    n_labels: int = 0


def clip_rows(audio: AudioTokens, clips_per_example: list[int]) -> list[list[tuple[Tensor, Tensor]]]:
    """Split the flat clip batch back into examples: [[(embeds, mask) per clip] per example]."""
    out, start = [], 0
    for count in clips_per_example:
        out.append([(audio.embeds[i], audio.mask[i]) for i in range(start, start + count)])
        start += count
    return out


class TextEmbedder:
    """Embed all text id lists of a batch with one embedding call."""

    def __init__(self, decoder: Decoder, id_lists: list[list[int]], device: torch.device) -> None:
        flat = torch.tensor([i for ids in id_lists for i in ids] or [0], dtype=torch.long, device=device)
        self._table = decoder.embed(flat)
        self._offsets = [0]
        for ids in id_lists:
            self._offsets.append(self._offsets[-1] + len(ids))

    def piece(self, index: int, ids: list[int], *, loss: bool = False) -> Piece:
        start, end = self._offsets[index], self._offsets[index + 1]
        embeds = self._table[start:end]
        device = embeds.device
        labels = torch.tensor(ids, dtype=torch.long, device=device) if loss else torch.full(
            (len(ids),), IGNORE, dtype=torch.long, device=device)
        return Piece(embeds, torch.ones(len(ids), dtype=torch.bool, device=device), labels,
                     n_labels=len(ids) if loss else 0)


def vocab_token_id(tokenizer, token: str, key: str = "end_token") -> int:
    """The id of ``token`` as one entry of the tokenizer's vocabulary (``<|im_end|>``, ``<|endoftext|>``);
    ValueError naming ``key`` when the tokenizer does not have it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or (ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"{key} {token!r} is not a token of this tokenizer")
    return ids[0]


def audio_piece(embeds: Tensor, mask: Tensor) -> Piece:
    return Piece(embeds, mask, torch.full((len(embeds),), IGNORE, dtype=torch.long, device=embeds.device))


class AudioBoundaries(nn.Module):
    """Learned audio start/end vectors at the decoder width (ALARM's audio_start / audio_end).

    ``wrap`` turns one clip's tokens into ``[start][clip tokens][end]`` pieces; both vectors are
    attended and carry no loss.
    """

    def __init__(self, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.start = nn.Parameter(torch.randn(dim) * init_std)
        self.end = nn.Parameter(torch.randn(dim) * init_std)

    def _piece(self, vector: Tensor, like: Tensor) -> Piece:
        embeds = vector.to(device=like.device, dtype=like.dtype)[None]
        return audio_piece(embeds, torch.ones(1, dtype=torch.bool, device=like.device))

    def wrap(self, embeds: Tensor, mask: Tensor) -> list[Piece]:
        return [self._piece(self.start, embeds), audio_piece(embeds, mask), self._piece(self.end, embeds)]


def audio_pieces(embeds: Tensor, mask: Tensor, boundaries: AudioBoundaries | None = None) -> list[Piece]:
    """One clip's pieces: its tokens, framed by learned start/end vectors when ``boundaries`` is given."""
    return [audio_piece(embeds, mask)] if boundaries is None else boundaries.wrap(embeds, mask)


def make_boundaries(enabled: bool, decoder: Decoder) -> AudioBoundaries | None:
    """The layouts' ``audio_boundaries`` option: vectors of the decoder's width, or None when off."""
    return AudioBoundaries(decoder.hidden_size) if enabled else None


def stack(examples: list[list[Piece]], *, left_pad: bool, use_mask: bool = True) -> DecoderInputs:
    """Concatenate each example's pieces and pad the batch.

    Position ids count only attended positions, the same way in training and in
    generation, so that padding (left or right) and masked audio frames never shift them.
    With ``use_mask=False`` (Mellow compatibility) every position is attended and
    no position ids are passed. Right padding is still harmless then (a causal
    decoder never looks ahead, and padded positions carry no labels), but left
    padding is not, so a generation batch must have rows of one length.
    """
    rows = [
        (torch.cat([p.embeds for p in pieces]), torch.cat([p.attend for p in pieces]),
         torch.cat([p.labels for p in pieces]))
        for pieces in examples
    ]
    longest = max(len(r[0]) for r in rows)
    if not use_mask and left_pad and any(len(r[0]) != longest for r in rows):
        raise ValueError("without an attention mask every prompt of a generation batch must have the same length")
    d = rows[0][0].shape[-1]
    ref = rows[0][0]
    embeds = ref.new_zeros(len(rows), longest, d)
    attend = torch.zeros(len(rows), longest, dtype=torch.bool, device=ref.device)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long, device=ref.device)
    for i, (e, a, lab) in enumerate(rows):
        span = slice(longest - len(e), longest) if left_pad else slice(0, len(e))
        embeds[i, span], attend[i, span], labels[i, span] = e, a, lab
    num_labels = sum(p.n_labels for pieces in examples for p in pieces)
    if not use_mask:
        return DecoderInputs(embeds, None, None, labels, num_labels=num_labels)
    position_ids = (attend.long().cumsum(1) - 1).clamp_min(0)
    return DecoderInputs(embeds, attend.long(), position_ids, labels, num_labels=num_labels)
