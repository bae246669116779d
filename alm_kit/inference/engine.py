"""Batched generation for every recipe: one engine behind the Python API, the CLI, eval and the server.

A batch is prepared once: each distinct clip is decoded, resampled per encoder
and encoded in one encoder call (a clip used twice in a batch is encoded
once); the recipe's layout builds the left-padded prefix; the decode loop
(:mod:`alm_kit.inference.decode`) produces the tokens with a preallocated KV
cache. A bad example (unreadable or empty audio, NaN samples, too many clips,
a prompt that does not fit the context) gets an error of its own; the rest of
the batch still completes.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from alm_kit.audio.io import AudioBlob, check_waveform, load_audio, prepare_for_specs
from alm_kit.config.schema import GenerationConfig
from alm_kit.data.batch import Batch, collate_waveforms
from alm_kit.errors import AlmKitError, GenerationError
from alm_kit.inference.decode import RowMonitor, RowOutput, decode, end_token_ids, single_token_id
from alm_kit.interfaces import AudioFeatures, TextInputs
from alm_kit.model import AudioLanguageModel
from alm_kit.runtime import inference_autocast
from alm_kit.text.thinking import THINK_CLOSE, THINK_OPEN

#: a path, encoded bytes, or a waveform (numpy array or tensor) with its sample rate
AudioInput = str | Path | AudioBlob | tuple[Any, int]


@dataclass
class Request:
    audio: list[AudioInput]
    prompt: str
    id: str = ""
    meta: dict = field(default_factory=dict)
    #: receives the text while it is generated (``alm-kit serve`` with ``stream: true``)
    stream: TextStream | None = None


@dataclass
class Generation:
    """One answer. ``text`` is everything generated (thought included, special tokens removed);
    thinking decoders also fill ``thought`` and ``answer`` separately."""

    id: str
    text: str = ""
    answer: str = ""
    thought: str | None = None
    #: "stop" (end token), "stop_string", "length", or "error"
    finish_reason: str = "error"
    tokens: list[int] = field(default_factory=list)
    #: decoder positions before the first new token: audio tokens, prompt and template
    prompt_tokens: int = 0
    #: the thought was closed by the thinking budget
    budget_hit: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class TextStream(Protocol):
    """Where a streamed request's text goes, called from the thread that runs the batch.

    ``piece`` gets only text that no later token can change (a stop string that may be forming,
    trailing spaces and half a UTF-8 character wait for the next token), so the pieces of a part
    add up to the final ``thought`` / ``answer``. The one exception: answer text followed by a
    ``<think>`` or a second ``</think>``, which the final answer drops after it was sent.
    Beam search sends its text when the search ends. ``finished`` comes as soon as the row is
    done, before the rest of its batch.
    """

    def piece(self, part: str, text: str) -> None:
        """``part`` is "thought" or "answer"."""

    def finished(self, result: Generation) -> None: ...


@dataclass
class _Clip:
    key: str
    fitted: dict[str, tuple[np.ndarray, int]]


def _clip_source(audio: AudioInput, where: str) -> tuple[np.ndarray, int, str]:
    if isinstance(audio, (str, Path, AudioBlob)):
        wave, rate = load_audio(audio)
        return check_waveform(wave, str(audio)), rate, f"file:{audio}"
    if not (isinstance(audio, tuple) and len(audio) == 2):
        raise GenerationError(f"{where}: audio must be a path, bytes (AudioBlob) or (waveform, sample_rate), "
                              f"got {type(audio).__name__}")
    wave, rate = audio
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().float().cpu().numpy()
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise GenerationError(f"{where}: sample rate must be a positive integer, got {rate!r}")
    return check_waveform(wave, where), int(rate), f"array:{id(audio[0])}"


def _check_clip_count(model: AudioLanguageModel, request: Request, where: str) -> None:
    limit = model.layout.max_audios
    if not request.audio:
        raise GenerationError(f"{where}: no audio given")
    if limit is not None and len(request.audio) > limit:
        raise GenerationError(f"{where}: {len(request.audio)} audio clips, but this recipe's layout takes at most "
                              f"{limit}")


#: clips per encoder pass on a CPU with ``encoder_batch: auto``. HTS-AT on 16 ten-second clips ran
#: 1.2-1.6x faster in passes of 2-4 clips than in one pass on a 2-core CPU (large activations stop
#: fitting the caches) and needs half the activation memory: ``benchmarks/pass_sizes.py``.
CPU_ENCODER_BATCH = 4


def clips_per_pass(params: GenerationConfig, device: torch.device) -> int | None:
    """``generation.encoder_batch`` resolved for ``device``; None = every clip in one pass."""
    if params.encoder_batch == "all" or (params.encoder_batch == "auto" and device.type == "cuda"):
        return None
    return CPU_ENCODER_BATCH if params.encoder_batch == "auto" else params.encoder_batch


def context_length(model: AudioLanguageModel) -> int | None:
    config = getattr(model.decoder.language_model, "config", None)
    return getattr(config, "max_position_embeddings", None)


class InferenceEngine:
    """Generation for one loaded model. Thread-compatible: one batch at a time."""

    def __init__(self, model: AudioLanguageModel, defaults: GenerationConfig | None = None) -> None:
        self.model = model.eval()
        self.defaults = defaults or GenerationConfig()
        self.tokenizer = model.decoder.tokenizer
        #: the layout takes a per-call thinking switch (placeholder layouts); for others (the prefix
        #: layout) ``thinking`` is ignored: they have no thinking mode to switch
        self.thinking_switch = "thinking" in inspect.signature(model.layout.tokenize).parameters
        self._think_ids = (single_token_id(self.tokenizer, THINK_OPEN), single_token_id(self.tokenizer, THINK_CLOSE))
        #: seconds spent on the last batch: audio (decoding, resampling, encoders), layout, prefill,
        #: decode, and the number of decode steps
        self.last_timings: dict[str, float] = {}

    def params(self, **overrides: Any) -> GenerationConfig:
        """The defaults with ``overrides`` applied (None values are ignored) and validated."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(GenerationConfig)})
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(GenerationConfig))
            raise GenerationError(f"unknown generation setting(s) {', '.join(unknown)}; allowed: {allowed}")
        try:
            return dataclasses.replace(self.defaults, **changes)
        except (TypeError, ValueError) as exc:
            raise GenerationError(f"bad generation settings: {exc}") from None

    # ------------------------------------------------------------------ preparation
    def _check_prompt(self, request: Request, where: str, params: GenerationConfig) -> None:
        limit = context_length(self.model)
        if not isinstance(request.prompt, str):
            raise GenerationError(f"{where}: the prompt must be a string, got {type(request.prompt).__name__}")
        if limit is None:
            return
        count = len(self.tokenizer.encode(request.prompt, add_special_tokens=False))
        if count + params.max_new_tokens > limit:
            raise GenerationError(f"{where}: the prompt is {count} tokens; with max_new_tokens "
                                  f"{params.max_new_tokens} it does not fit the decoder's context of {limit}")

    def _prepare(self, requests: Sequence[Request], params: GenerationConfig) -> tuple[list[int], list[list[int]], list[_Clip], list[str | None]]:
        """Decode every distinct clip once. Returns (good request indices, clip ids per good request,
        distinct clips, per-request error)."""
        specs = self.model.audio_specs
        errors: list[str | None] = [None] * len(requests)
        clips: dict[str, int] = {}
        distinct: list[_Clip] = []
        good, refs = [], []
        for i, request in enumerate(requests):
            where = f"example {request.id or i}"
            try:
                _check_clip_count(self.model, request, where)
                self._check_prompt(request, where, params)
                ids = []
                for j, audio in enumerate(request.audio):
                    wave, rate, key = _clip_source(audio, f"{where}, audio {j + 1}")
                    if key not in clips:
                        clips[key] = len(distinct)
                        distinct.append(_Clip(key, prepare_for_specs(wave, rate, specs, train=False)))
                    ids.append(clips[key])
            except (AlmKitError, ValueError) as exc:
                errors[i] = str(exc)
                continue
            good.append(i)
            refs.append(ids)
        return good, refs, distinct, errors

    def _features(self, distinct: list[_Clip], refs: list[list[int]],
                  params: GenerationConfig) -> dict[str, AudioFeatures]:
        """All distinct clips through each encoder in one call (in passes of ``encoder_batch`` clips),
        then one row per clip reference."""
        waveforms, lengths = collate_waveforms([c.fitted for c in distinct], list(self.model.audio_specs))
        with torch.no_grad():
            encoded = self.model.encode(waveforms, lengths, clips_per_pass(params, self.model.device))
        index = torch.tensor([c for ids in refs for c in ids], device=self.model.device)
        return {name: f.index(index) for name, f in encoded.items()}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_batch(self, requests: Sequence[Request], params: GenerationConfig) -> list[Generation]:
        """One batch: every request in one prefix and one decode loop."""
        model = self.model
        results = [Generation(id=r.id or str(i)) for i, r in enumerate(requests)]
        self.last_timings = {}
        start = time.perf_counter()
        good, refs, distinct, errors = self._prepare(requests, params)
        for i, error in enumerate(errors):
            results[i].error = error
        if not good:
            return results
        device = model.device
        with inference_autocast(model, device):
            batch = Batch(ids=[requests[i].id for i in good], prompts=[requests[i].prompt for i in good],
                          responses=None, clips_per_example=[len(r) for r in refs],
                          clip_keys=[distinct[c].key for ids in refs for c in ids],
                          features=self._features(distinct, refs, params))
            encoded = time.perf_counter()
            try:
                inputs = model.decoder_inputs(batch, for_generation=True,
                                              thinking=params.thinking if self.thinking_switch else None)
            except ValueError as exc:  # a layout refusing the batch (e.g. placeholders vs clips)
                for i in good:
                    results[i].error = str(exc)
                return results
            laid_out = time.perf_counter()
            self.last_timings = {"audio": encoded - start, "layout": laid_out - encoded}
        return self._decode_rows(good, inputs, params, results, {i: requests[i].stream for i in good})

    def _decode_rows(self, good: list[int], inputs, params: GenerationConfig, results: list[Generation],
                     streams: dict[int, Any] | None = None) -> list[Generation]:
        """The part every batch shares, audio or text-only: rows that do not fit the context get an
        error, the rest are decoded (streamed where a stream is given) and finished."""
        model = self.model
        good, inputs = self._fit_context(good, inputs, params, results)
        if not good:
            return results
        for i, used in zip(good, _positions(inputs)):
            results[i].prompt_tokens = used
        monitor = RowMonitor(self.tokenizer, params, end_token_ids(model.layout, self.tokenizer),
                             [[t for t in ids if t >= 0] for ids in inputs.text.prompt_ids])
        streams = streams or {}
        live = {row: _RowStream(self, results[i], streams[i], params)
                for row, i in enumerate(good) if streams.get(i) is not None}
        if live:
            monitor.on_token = lambda row, out, done: row in live and live[row].update(out, done)
        with torch.no_grad(), inference_autocast(model, model.device):
            rows = decode(model.decoder, inputs, params, monitor)
        self.last_timings.update(monitor.timings)
        for i, row in zip(good, rows):
            self._finish(results[i], row, params)
        for row, stream in live.items():  # beam search: text only now
            stream.update(rows[row], done=True)
        return results

    def _fit_context(self, good: list[int], inputs, params: GenerationConfig,
                     results: list[Generation]) -> tuple[list[int], Any]:
        """Drop rows whose prefix + max_new_tokens exceed the decoder's context (each gets an error)."""
        limit = context_length(self.model)
        if limit is None:
            return good, inputs
        used = _positions(inputs)
        fits = [n + params.max_new_tokens <= limit for n in used]
        if all(fits):
            return good, inputs
        for i, n, ok in zip(good, used, fits):
            if not ok:
                results[i].error = (f"example {results[i].id}: the prompt (and audio) take {n} positions; with "
                                    f"max_new_tokens {params.max_new_tokens} that exceeds the decoder's context "
                                    f"of {limit}")
        keep = torch.tensor([j for j, ok in enumerate(fits) if ok], device=inputs.inputs_embeds.device)
        if len(keep) == 0:
            return [], inputs
        take = lambda t: None if t is None else t[keep]  # noqa: E731
        inputs = dataclasses.replace(inputs, inputs_embeds=inputs.inputs_embeds[keep],
                                     attention_mask=take(inputs.attention_mask), position_ids=take(inputs.position_ids),
                                     text=dataclasses.replace(inputs.text, prompt_ids=[
                                         inputs.text.prompt_ids[j] for j in keep.tolist()]))
        return [i for i, ok in zip(good, fits) if ok], inputs

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _parts(self, tokens: list[int], opened_in_prompt: bool) -> tuple[str | None, str]:
        """(thought, answer) of a row's tokens as decoded text, before stop strings and stripping."""
        open_id, close_id = self._think_ids
        if close_id is not None and close_id in tokens:
            close = len(tokens) - 1 - tokens[::-1].index(close_id)
            start = tokens.index(open_id) + 1 if open_id in tokens[:close] else 0
            return self._decode_text(tokens[start:close]), self._decode_text(tokens[close + 1:])
        if opened_in_prompt or (open_id is not None and open_id in tokens):
            start = tokens.index(open_id) + 1 if open_id in tokens else 0
            return self._decode_text(tokens[start:]), ""
        return None, self._decode_text(tokens)

    def _finish(self, result: Generation, row: RowOutput, params: GenerationConfig) -> None:
        tokens = row.tokens
        thought, answer = self._parts(tokens, row.opened_in_prompt)
        result.text = _cut(self._decode_text(tokens), params.stop).strip()
        result.answer = _cut(answer, params.stop).strip()
        result.thought = None if thought is None else thought.strip()
        result.tokens = list(tokens)
        result.finish_reason = row.finish_reason
        result.budget_hit = row.budget_hit

    @torch.no_grad()
    def generate_text_batch(self, prompts: Sequence[str], params: GenerationConfig, *,
                            chat: bool = True, system: str | None = None) -> list[Generation]:
        """The decoder alone as a text LLM (no audio): each prompt rendered with the tokenizer's chat
        template (``params.thinking`` reaches templates that know it) or used as it is with ``chat=False``."""
        from alm_kit.nn.sequence import TextEmbedder, stack

        tok = self.tokenizer
        results = [Generation(id=str(i)) for i in range(len(prompts))]
        ids = []
        for prompt in prompts:
            if chat and getattr(tok, "chat_template", None):
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt}]
                extra = {} if params.thinking is None else {"enable_thinking": params.thinking}
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
            else:
                text = prompt
            ids.append(tok.encode(text, add_special_tokens=False) or [tok.eos_token_id])
        with torch.no_grad(), inference_autocast(self.model, self.model.device):
            embedder = TextEmbedder(self.model.decoder, ids, self.model.device)
            inputs = stack([[embedder.piece(i, prompt_ids)] for i, prompt_ids in enumerate(ids)], left_pad=True)
        inputs.text = TextInputs(prompt_ids=ids)
        self.last_timings = {}
        return self._decode_rows(list(range(len(prompts))), inputs, params, results)

    def run(self, requests: Sequence[Request], params: GenerationConfig | None = None, *, progress: bool = False,
            on_batch: Callable[[list[Request], list[Generation]], None] | None = None) -> list[Generation]:
        """Every request, in batches of ``params.batch_size`` grouped by similar prompt length (less
        padding); results come back in request order. ``on_batch`` sees each finished batch."""
        params = params or self.defaults
        if params.do_sample:
            torch.manual_seed(params.seed)
        order = sorted(range(len(requests)), key=lambda i: (len(requests[i].audio), len(requests[i].prompt)))
        results: list[Generation | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", unit="ex", disable=not progress)
        for start in range(0, len(order), params.batch_size):
            chunk = order[start : start + params.batch_size]
            batch = [requests[i] for i in chunk]
            out = self.generate_batch(batch, params)
            for i, generation in zip(chunk, out):
                results[i] = generation
            if on_batch is not None:
                on_batch(batch, out)
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = min((text.index(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def _positions(inputs) -> list[int]:
    """Real (unpadded) prefix positions of each row."""
    b, length = inputs.inputs_embeds.shape[:2]
    return inputs.attention_mask.sum(1).tolist() if inputs.attention_mask is not None else [length] * b


class _RowStream:
    """Sends one row's thought and answer to its :class:`TextStream` as far as they are settled.

    Text is decoded incrementally (each new token with the few before it, as TGI and vLLM do), so
    a streamed row costs the same per token at its 2000th token as at its 10th."""

    def __init__(self, engine: InferenceEngine, result: Generation, sink: TextStream,
                 params: GenerationConfig) -> None:
        self.engine, self.result, self.sink, self.params = engine, result, sink, params
        self.stops = [s for s in params.stop if s]
        self.sent = {"thought": "", "answer": ""}
        self.raw = {"thought": "", "answer": ""}
        self.part: str | None = None
        self.seen = self.prefix = self.read = 0  # tokens looked at; the decode window [prefix, read)
        self.closed = False

    def update(self, row: RowOutput, done: bool) -> None:
        if self.closed:
            return
        if done:
            self.closed = True
            self.engine._finish(self.result, row, self.params)
            self._send("thought", self.result.thought or "")
            self._send("answer", self.result.answer)
            self.sink.finished(self.result)
            return
        tokens = row.tokens
        if self.part is None:
            self.part = "thought" if row.opened_in_prompt else "answer"
        open_id, close_id = self.engine._think_ids
        for i in range(self.seen, len(tokens)):
            if tokens[i] in (open_id, close_id):  # the same split as InferenceEngine._parts
                if tokens[i] == close_id or self.part == "answer":
                    self.part = "answer" if tokens[i] == close_id else "thought"
                    self.prefix = self.read = i + 1
                    if self.part == "answer":  # the answer starts (again) here: keep the text flowing
                        self.raw["answer"] = self.sent["answer"] = ""
        self.seen = len(tokens)
        before = self.engine._decode_text(tokens[self.prefix:self.read])
        now = self.engine._decode_text(tokens[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # not half a UTF-8 character
            self.raw[self.part] += now[len(before):]
            self.prefix, self.read = self.read, len(tokens)
        self._send("thought", _settled(self.raw["thought"], []))
        self._send("answer", _settled(_cut(self.raw["answer"], self.stops), self.stops))

    def _send(self, part: str, text: str) -> None:
        sent = self.sent[part]
        if len(text) > len(sent) and text.startswith(sent):
            self.sent[part] = text
            self.sink.piece(part, text[len(sent):])


def _settled(text: str, stops: Sequence[str]) -> str:
    """The part of a growing text that the final (stripped, stop-cut) text will start with: without a
    tail that may become a stop string, or trailing spaces."""
    end = len(text) - max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    while end and text[end - 1].isspace():
        end -= 1
    return text[:end].lstrip()


def generate(model: AudioLanguageModel, requests: Sequence[Request], gen: GenerationConfig, *,
             progress: bool = False) -> list[str]:
    """Answers as strings (the thought included for thinking decoders); raises on the first bad example."""
    results = InferenceEngine(model, gen).run(requests, gen, progress=progress)
    for result in results:
        if result.error:
            raise GenerationError(result.error)
    return [r.text for r in results]


def make_batch(model: AudioLanguageModel, requests: Sequence[Request]) -> Batch:
    """Requests as a waveform :class:`Batch` (one row per clip reference), as the training path sees them."""
    specs = model.audio_specs
    clips, keys = [], []
    for i, request in enumerate(requests):
        for j, audio in enumerate(request.audio):
            wave, rate, key = _clip_source(audio, f"example {request.id or i}, audio {j + 1}")
            clips.append(prepare_for_specs(wave, rate, specs, train=False))
            keys.append(key)
    waveforms, lengths = collate_waveforms(clips, list(specs))
    return Batch(ids=[r.id for r in requests], prompts=[r.prompt for r in requests], responses=None,
                 clips_per_example=[len(r.audio) for r in requests], clip_keys=keys,
                 waveforms=waveforms, lengths=lengths)
