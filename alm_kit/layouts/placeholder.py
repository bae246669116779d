"""Chat-template layout: each ``<audio>`` placeholder in the user turn becomes one clip's tokens.

The prompt is rendered with the tokenizer's chat template (user turn, then the
assistant header), split at the placeholder string and tokenized piece by
piece, so the placeholder never has to be in the vocabulary. A prompt without
placeholders gets one per clip in front of its text. The answer ends with the
template's end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass

from alm_kit.interfaces import AudioTokens, Decoder, DecoderInputs, Layout, TextInputs
from alm_kit.nn.sequence import TextEmbedder, audio_pieces, clip_rows, make_boundaries, stack, vocab_token_id

#: markers in prompt ids (never real token ids): one clip here / all of the example's clips here
ONE_CLIP, ALL_CLIPS = -1, -2


class PlaceholderLayout(Layout):
    """``<audio>`` placeholders inside the decoder's chat template (Qwen3, SmolLM2-Instruct, ...)."""

    @dataclass
    class Config:
        placeholder: str = "<audio>"
        system_prompt: str | None = None
        #: render with the tokenizer's chat template; false: "{prompt}\n" plain text
        chat_template: bool = True
        #: Qwen3's thinking mode: false pre-fills an empty <think></think> block in the prompt (answers
        #: without reasoning); true / null leave the model to open the block. Only for templates that read it
        enable_thinking: bool | None = None
        #: token that ends an answer (default: <|im_end|> if the tokenizer has it, else EOS)
        end_token: str | None = None
        max_prompt_tokens: int = 2048
        #: learned audio start/end vectors (decoder width) around every clip's tokens (ALARM)
        audio_boundaries: bool = False

    def __init__(self, config: Config, decoder: Decoder) -> None:
        super().__init__(config, decoder)
        self.boundaries = make_boundaries(config.audio_boundaries, decoder)
        if config.enable_thinking is not None and config.chat_template:
            # Jinja ignores unknown variables: without this check the setting would silently do nothing
            template = getattr(decoder.tokenizer, "chat_template", None)
            if not template or "enable_thinking" not in str(template):
                raise ValueError(
                    "placeholder: enable_thinking is set but this tokenizer's chat template does not read it "
                    "(Qwen3's does; builtin:tiny-qwen3 is the offline stand-in): remove enable_thinking"
                )

    def end_token_id(self) -> int:
        tok = self.decoder.tokenizer
        name = self.config.end_token
        if name is None:
            name = "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else tok.eos_token
        return vocab_token_id(tok, name)

    def render(self, prompt: str, thinking: bool | None = None) -> str:
        cfg = self.config
        tok = self.decoder.tokenizer
        if not cfg.chat_template or not getattr(tok, "chat_template", None):
            return prompt + "\n"
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        thinking = cfg.enable_thinking if thinking is None else thinking
        extra = {} if thinking is None else {"enable_thinking": thinking}
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    def tokenize(self, prompts: list[str], responses: list[str] | None = None, *,
                 thinking: bool | None = None) -> TextInputs:
        """Prompt ids carry markers where clips go: ONE_CLIP per placeholder, ALL_CLIPS if none was written.

        ``thinking`` overrides ``enable_thinking`` for this call."""
        tok = self.decoder.tokenizer
        placeholder = self.config.placeholder
        prompt_ids = []
        for prompt in prompts:
            marker = ONE_CLIP if placeholder in prompt else ALL_CLIPS
            text = prompt if marker == ONE_CLIP else f"{placeholder}\n{prompt}"
            ids: list[int] = []
            for j, segment in enumerate(self.render(text, thinking).split(placeholder)):
                if j:
                    ids.append(marker)
                ids += tok.encode(segment, add_special_tokens=False)
            prompt_ids.append(ids[-self.config.max_prompt_tokens :])
        response_ids = None
        if responses is not None:
            end = self.end_token_id()
            response_ids = [tok.encode(r, add_special_tokens=False) + [end] for r in responses]
        return TextInputs(prompt_ids, response_ids)

    def _runs(self, ids: list[int], clips: int, index: int) -> list[list[int] | int]:
        """Split prompt ids into text runs and clip slots (ints = clip index)."""
        runs: list[list[int] | int] = [[]]
        slot = 0
        for token in ids:
            if token in (ONE_CLIP, ALL_CLIPS):
                take = 1 if token == ONE_CLIP else clips
                runs += list(range(slot, slot + take)) + [[]]
                slot += take
            else:
                runs[-1].append(token)
        if slot != clips:
            raise ValueError(
                f"example {index}: the prompt has {slot} '{self.config.placeholder}' placeholders but {clips} clips"
            )
        return runs

    def assemble(self, text: TextInputs, audio: AudioTokens, clips_per_example: list[int],
                 for_generation: bool) -> DecoderInputs:
        with_response = text.response_ids is not None and not for_generation
        runs = [self._runs(ids, clips_per_example[i], i) for i, ids in enumerate(text.prompt_ids)]
        text_runs = [r for example in runs for r in example if isinstance(r, list)]
        embedder = TextEmbedder(self.decoder, text_runs + (text.response_ids if with_response else []),
                                audio.embeds.device)
        examples, k = [], 0
        for i, clips in enumerate(clip_rows(audio, clips_per_example)):
            pieces = []
            for run in runs[i]:
                if isinstance(run, int):
                    pieces += audio_pieces(*clips[run], self.boundaries)
                else:
                    pieces.append(embedder.piece(k, run))
                    k += 1
            if with_response:
                pieces.append(embedder.piece(len(text_runs) + i, text.response_ids[i], loss=True))
            examples.append(pieces)
        inputs = stack(examples, left_pad=for_generation)
        if not with_response:
            inputs.labels = None
        return inputs
