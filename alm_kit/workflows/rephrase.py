"""ALARM's self-rephrasing: training targets written by the frozen decoder itself (docs/alarm.md).

For every example of a manifest whose audio is described in text (``description``, docs/data.md)
the recipe's decoder, used as a text-only LLM through the inference engine:

1. answers the prompt from the description -> R0 (its thought and its answer kept apart);
2. rewrites R0 as if it had heard the audio -> R_text (the thought rewritten too, inside
   ``<reasoning>`` tags, so the rewriter never mistakes it for its own thinking).

Both prompts are template files next to the recipe (``rephrase.answer_prompt`` /
``rephrase.rewrite_prompt``). A rewrite that still matches a pattern of ``rephrase.filter``
(it mentions the description, the metadata, a transcript...) is dropped. Kept examples go to the
output manifest with ``response`` = R_text (``<think>\\n{thought}\\n</think>\\n\\n{answer}`` when R0
had a thought); dropped and failed ones go to ``<out>.rejected.jsonl`` with the reason; the counts
go to ``<out>.report.json``. Both files are appended after every batch, so a re-run skips every id
already in either of them (``retry`` runs the rejected ones again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from alm_kit.config.loader import COMMAND_LINE, origin_of
from alm_kit.config.schema import GenerationConfig, Recipe, RephraseConfig
from alm_kit.data.manifest import Example, description_of, read_manifest
from alm_kit.errors import AlmKitError, ManifestError
from alm_kit.text.thinking import THINK_CLOSE, THINK_OPEN, format_thinking

#: how R0's thought is shown to the rewriter, and how the rewritten one is found again
REASONING_OPEN, REASONING_CLOSE = "<reasoning>", "</reasoning>"
#: the rewrite prompt asks for the whole rewrite between these (optional: small models forget them)
REWRITE_OPEN, REWRITE_CLOSE = "<rewrite>", "</rewrite>"
#: what each template may contain; any other {...} is left as it is
PLACEHOLDERS = ("description", "prompt", "answer", "thought", "response")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
#: why an example was not kept
REASONS = ("filter", "no_answer", "format", "empty", "error")


class RephraseError(AlmKitError):
    """The rephrase settings or files cannot be used (the message names the file or key)."""


# --------------------------------------------------------------------------- prompt files
@dataclass
class RephraseFiles:
    """The recipe's templates and filter, read from disk."""

    answer: str
    rewrite: str
    #: (pattern as written, compiled case-insensitive)
    filter: list[tuple[str, re.Pattern]] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)


def fill(template: str, **values: str) -> str:
    """The template with each known ``{name}`` replaced (one pass: values are never re-read)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _resolve(recipe: Recipe, key: str, value: str) -> Path:
    """A rephrase path: relative to the recipe file that set it (command line, checkpoints: the current dir)."""
    path = Path(value).expanduser()
    origin = origin_of(recipe, f"rephrase.{key}")
    if path.is_absolute() or origin in (None, COMMAND_LINE):
        return path
    return Path(origin).parent / path


def _read(path: Path, key: str, recipe: Recipe) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = origin_of(recipe, f"rephrase.{key}") or "the checkpoint's recipe (paths relative to the current directory)"
        raise RephraseError(f"rephrase.{key}: file not found: {path} (set in {where})") from None


def read_filter(path: Path) -> list[tuple[str, re.Pattern]]:
    """Regular expressions, one per line; blank lines and lines starting with # are skipped."""
    patterns = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            patterns.append((text, re.compile(text, re.IGNORECASE)))
        except re.error as exc:
            raise RephraseError(f"{path}:{number}: not a valid regular expression ({exc}): {text}") from None
    return patterns


def load_files(recipe: Recipe) -> RephraseFiles:
    settings = recipe.rephrase
    if settings is None:
        raise RephraseError(f"recipe '{recipe.name}' has no rephrase section (answer_prompt, rewrite_prompt, filter; "
                            "see recipes/alarm.yaml and docs/alarm.md)")
    paths = {key: _resolve(recipe, key, getattr(settings, key))
             for key in ("answer_prompt", "rewrite_prompt", "filter") if getattr(settings, key)}
    answer, rewrite = (_read(paths[k], k, recipe) for k in ("answer_prompt", "rewrite_prompt"))
    for key, text, needed in (("answer_prompt", answer, ("{description}", "{prompt}")),
                              ("rewrite_prompt", rewrite, ("{response}|{answer}",))):
        for need in needed:
            if not any(n in text for n in need.split("|")):
                raise RephraseError(f"{paths[key]}: rephrase.{key} must contain {need.replace('|', ' or ')} "
                                    f"(placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
    if "filter" in paths and not paths["filter"].exists():
        _read(paths["filter"], "filter", recipe)
    patterns = read_filter(paths["filter"]) if "filter" in paths else []
    return RephraseFiles(answer, rewrite, patterns, paths)


# --------------------------------------------------------------------------- R0 in, R_text out
def render_response(thought: str | None, answer: str) -> str:
    """R0 as the rewriter sees it: the thought in <reasoning> tags (never <think>), then the answer."""
    if not thought:
        return answer.strip()
    return f"{REASONING_OPEN}\n{thought.strip()}\n{REASONING_CLOSE}\n\n{answer.strip()}"


def parse_rewrite(text: str, with_thought: bool) -> tuple[str | None, str] | None:
    """(rewritten thought, rewritten answer) from the rewriter's answer; None when R0 had a thought and
    the rewrite has no closed reasoning section. The text between the last <rewrite> and </rewrite> is
    used when the tags are there, else all of it."""
    start = text.rfind(REWRITE_OPEN)
    if start >= 0:
        text = text[start + len(REWRITE_OPEN):]
    end = text.find(REWRITE_CLOSE)
    if end >= 0:
        text = text[:end]
    if not with_thought:
        return None, text.replace(REASONING_OPEN, "").replace(REASONING_CLOSE, "").strip()
    if REASONING_CLOSE not in text:
        return None
    thought, _, answer = text.rpartition(REASONING_CLOSE)
    thought = thought.split(REASONING_OPEN)[-1]
    return thought.strip(), answer.strip()


def target_text(thought: str | None, answer: str) -> str:
    """R_text as a training response: Qwen3's layout of a reasoning turn when there is a thought."""
    return format_thinking(thought, answer) if thought else answer


def filter_hits(patterns: Sequence[tuple[str, re.Pattern]], text: str) -> list[str]:
    return [written for written, rx in patterns if rx.search(text)]


# --------------------------------------------------------------------------- the decoder alone
class TextModel(nn.Module):
    """A recipe's decoder and layout without the audio side: all that text-only generation uses,
    so rephrasing never builds (or downloads) the encoders."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        from alm_kit.registry.build import build_component

        options = {"origin": lambda key: origin_of(recipe, key), "seed": recipe.training.seed}
        self.decoder = build_component("decoder", recipe.model.decoder, "model.decoder", **options)
        self.layout = build_component("layout", recipe.model.layout, "model.layout", self.decoder, **options)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def load_text_engine(source: str | Path, *, device: str = "auto", overrides: Sequence[str] = ()):
    """(InferenceEngine, recipe) for a recipe .yaml (its decoder only) or a checkpoint (the whole model)."""
    from alm_kit.inference.engine import InferenceEngine

    source = Path(source)
    if source.is_dir():
        from alm_kit.inference.api import ALM

        alm = ALM.from_pretrained(source, device=device)
        if not overrides:
            return alm.engine, alm.recipe
        recipe = _override_settings(alm.recipe, overrides)
        return InferenceEngine(alm.model, recipe.generation), recipe
    if source.suffix in (".yaml", ".yml") and source.exists():
        from alm_kit.config import load_recipe
        from alm_kit.runtime import resolve_device

        recipe = load_recipe(source, list(overrides))
        model = TextModel(recipe).to(resolve_device(device)).eval()
        return InferenceEngine(model, recipe.generation), recipe
    raise FileNotFoundError(f"{source}: not an alm-kit checkpoint directory or a recipe .yaml file")


def _override_settings(recipe: Recipe, overrides: Sequence[str]) -> Recipe:
    """A checkpoint's recipe with ``rephrase.*`` / ``generation.*`` overrides (its model is fixed); every
    rephrase path of the result is relative to the current directory."""
    from alm_kit.config.loader import _apply_override, parse_override, recipe_from_dict, recipe_to_dict

    data = recipe_to_dict(recipe)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in ("rephrase", "generation"):
            raise RephraseError(f"override '{text}': a checkpoint's model and training are fixed; only rephrase.* "
                                "and generation.* can be set")
        _apply_override(data, parts, value, text)
    return recipe_from_dict(data, source=COMMAND_LINE)


# --------------------------------------------------------------------------- the file pipeline
@dataclass
class RephraseReport:
    input: str
    output: str
    rejected: str
    #: examples in the input (after ``limit``)
    total: int = 0
    #: ids already in the output or the rejected file (not run again)
    already_done: int = 0
    kept: int = 0
    #: reason -> examples not kept in this run (filter, no_answer, format, empty, error)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    #: filter pattern -> rewrites it matched in this run (a rewrite may match several)
    filter_hits: dict[str, int] = field(default_factory=dict)
    #: R0 thoughts closed by the thinking budget; steps that stopped at max_new_tokens
    budget_hits: int = 0
    truncated: dict[str, int] = field(default_factory=lambda: {"answer": 0, "rewrite": 0})
    #: lines in the output / rejected file after this run (every run so far)
    output_lines: int = 0
    rejected_lines: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return self.dropped["error"]

    def summary(self) -> str:
        ran = self.total - self.already_done
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items() if n) or "none"
        lines = [f"{self.output}: {self.kept} kept of {ran} rephrased (dropped: {dropped}); "
                 f"{self.already_done} already done, {self.total} in {self.input}"]
        for pattern, n in sorted(self.filter_hits.items(), key=lambda kv: -kv[1]):
            lines.append(f"  filter {n:5d}  {pattern}")
        if self.budget_hits or any(self.truncated.values()):
            lines.append(f"  thinking budget hit in {self.budget_hits} answer(s); stopped at max_new_tokens: "
                         f"{self.truncated['answer']} answer(s), {self.truncated['rewrite']} rewrite(s)")
        lines.append(f"  totals: {self.output_lines} in the output, {self.rejected_lines} in {self.rejected}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "failed": self.failed}


def side_files(output: Path) -> tuple[Path, Path]:
    """``<out>.rejected.jsonl`` and ``<out>.report.json`` next to the output manifest."""
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}.rejected.jsonl"), output.with_name(f"{stem}.report.json")


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # an unfinished line: that example runs again
    return out


def _clip_paths(example: Example, output: Path) -> str | list[str]:
    folder = os.path.abspath(output.parent)
    paths = [os.path.relpath(os.path.abspath(p), folder) for p in example.audio]
    return paths[0] if len(paths) == 1 else paths


def _check_budget(engine, params: GenerationConfig) -> None:
    from alm_kit.inference.decode import single_token_id

    tok = engine.tokenizer
    if params.thinking_budget is not None and None in (single_token_id(tok, THINK_OPEN),
                                                       single_token_id(tok, THINK_CLOSE)):
        raise RephraseError(f"thinking_budget {params.thinking_budget} needs a thinking decoder (single {THINK_OPEN} "
                            f"and {THINK_CLOSE} tokens); this tokenizer has none: set generation.thinking_budget=null")


def rephrase_file(engine, recipe: Recipe, source: str | Path, output: str | Path,
                  params: GenerationConfig | None = None, *, limit: int | None = None, retry: bool = False,
                  progress: bool = True) -> RephraseReport:
    """Rephrase a described manifest into a training manifest (module docstring); resumable."""
    from alm_kit.inference.files import drop_partial_line

    started = time.monotonic()
    source, output = Path(source), Path(output)
    settings: RephraseConfig = recipe.rephrase  # type: ignore[assignment]
    files = load_files(recipe)
    params = params or engine.defaults
    _check_budget(engine, params)
    answer_params = dataclasses.replace(params, max_new_tokens=settings.answer_max_new_tokens)
    rewrite_params = dataclasses.replace(params, max_new_tokens=settings.rewrite_max_new_tokens,
                                         thinking=params.thinking if settings.rewrite_thinking is None
                                         else settings.rewrite_thinking)

    examples = read_manifest(source, require_response=False)[:limit]
    ids = Counter(e.id for e in examples)
    repeated = sorted(i for i, n in ids.items() if n > 1)
    if repeated:
        raise ManifestError(f"{source}: ids must be unique to resume, repeated: {', '.join(repeated[:5])}")
    descriptions = {e.id: description_of(e) for e in examples}
    missing = [e.source for e in examples if not descriptions[e.id]]
    if missing:
        raise ManifestError(f"{missing[0]}: no description of the audio (field 'description', docs/data.md)"
                            + (f"; {len(missing) - 1} more example(s) lack one" if len(missing) > 1 else ""))

    rejected_path, report_path = side_files(output)
    for path in (output, rejected_path):
        drop_partial_line(path)
    done = {str(r.get("id")) for r in _records(output)}
    rejected = _records(rejected_path)
    attempts = {str(r.get("id")): int(r.get("attempt", 1)) for r in rejected}
    if retry:
        keep = [r for r in rejected if str(r.get("id")) not in ids]
        rejected_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    else:
        done |= set(attempts)
    todo = [e for e in examples if e.id not in done]
    todo.sort(key=lambda e: len(descriptions[e.id]) + len(e.prompt))  # similar lengths share a batch
    report = RephraseReport(str(source), str(output), str(rejected_path), total=len(examples),
                            already_done=len(examples) - len(todo))

    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="rephrasing", unit="ex", disable=not progress)
    with output.open("a", encoding="utf-8") as kept_sink, rejected_path.open("a", encoding="utf-8") as rejected_sink:
        for start in range(0, len(todo), params.batch_size):
            batch = todo[start : start + params.batch_size]
            attempt = {e.id: attempts.get(e.id, 0) + 1 for e in batch}
            seed = params.seed + max(attempt.values()) - 1  # a retry samples anew
            kept, dropped = _rephrase_batch(engine, files, batch, descriptions, attempt, report,
                                            dataclasses.replace(answer_params, seed=seed),
                                            dataclasses.replace(rewrite_params, seed=seed), output)
            kept_sink.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
            rejected_sink.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in dropped)
            kept_sink.flush()
            rejected_sink.flush()
            bar.update(len(batch))
    bar.close()
    report.output_lines = len(_records(output))
    report.rejected_lines = len(_records(rejected_path))
    report.seconds = round(time.monotonic() - started, 3)
    report_path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _rephrase_batch(engine, files: RephraseFiles, batch: list[Example], descriptions: dict[str, str],
                    attempt: dict[str, int], report: RephraseReport, answer_params: GenerationConfig,
                    rewrite_params: GenerationConfig, output: Path) -> tuple[list[dict], list[dict]]:
    """Both steps for one batch: (kept training records, rejected records)."""
    kept, dropped = [], []

    def reject(example: Example, reason: str, **extra: Any) -> None:
        report.dropped[reason] += 1
        dropped.append({"id": example.id, "reason": reason, "attempt": attempt[example.id], "prompt": example.prompt,
                        "description": descriptions[example.id], **extra})

    prompts = [fill(files.answer, description=descriptions[e.id], prompt=e.prompt) for e in batch]
    answers = engine.generate_text_batch(prompts, answer_params)
    second = []
    for example, r0 in zip(batch, answers):
        report.budget_hits += r0.budget_hit
        report.truncated["answer"] += r0.finish_reason == "length"
        if r0.error:
            reject(example, "error", error=f"answer step: {r0.error}")
        elif not r0.answer.strip():
            reject(example, "no_answer", r0_thought=r0.thought, finish_reason=r0.finish_reason)
        else:
            second.append((example, r0))
    if not second:
        return kept, dropped
    prompts = [fill(files.rewrite, description=descriptions[e.id], prompt=e.prompt, answer=r0.answer.strip(),
                    thought=(r0.thought or "").strip(), response=render_response(r0.thought, r0.answer))
               for e, r0 in second]
    rewrites = engine.generate_text_batch(prompts, rewrite_params)
    for (example, r0), rewrite in zip(second, rewrites):
        report.truncated["rewrite"] += rewrite.finish_reason == "length"
        context = {"r0": r0.answer, "r0_thought": r0.thought}
        if rewrite.error:
            reject(example, "error", error=f"rewrite step: {rewrite.error}", **context)
            continue
        context["rewrite"] = rewrite.answer
        parsed = parse_rewrite(rewrite.answer, with_thought=bool(r0.thought))
        if parsed is None:
            reject(example, "format", **context)
            continue
        thought, answer = parsed
        if not answer:
            reject(example, "empty", **context)
            continue
        hits = filter_hits(files.filter, f"{thought or ''}\n{answer}")
        for pattern in hits:
            report.filter_hits[pattern] = report.filter_hits.get(pattern, 0) + 1
        if hits:
            reject(example, "filter", matched=hits, **context)
            continue
        report.kept += 1
        record = {"id": example.id, "audio": _clip_paths(example, output), "prompt": example.prompt,
                  "response": target_text(thought, answer), "description": descriptions[example.id],
                  "r0": r0.answer, "r0_thought": r0.thought, "rewrite_thought": rewrite.thought}
        if example.response is not None:
            record["original_response"] = example.response
        kept.append({**record, **{k: v for k, v in example.meta.items() if k not in record}})
    return kept, dropped
