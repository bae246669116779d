"""Answer a JSON Lines file of examples into a JSON Lines file of answers, resumably.

Input lines are manifest records without a response (docs/data.md):
``{"id": "...", "audio": "a.wav" | ["a.wav", "b.wav"], "prompt": "..."}``; audio paths are
relative to the input file. Each output line repeats the id, audio and prompt and adds
``text``, ``answer``, ``thought``, ``finish_reason`` and ``error``; the input's other fields are kept,
and one whose name is a result field (a manifest's gold ``answer``, say) is kept as ``input_<name>``, so
the result fields are always the model's. Answers are appended
after every batch, so an interrupted run loses at most one batch; a re-run skips the ids
already in the output (``retry_errors`` re-runs the ones that failed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alm_kit.config.schema import GenerationConfig
from alm_kit.data.manifest import read_manifest
from alm_kit.errors import ManifestError
from alm_kit.inference.engine import Generation, InferenceEngine, Request


@dataclass
class FileReport:
    total: int
    skipped: int
    answered: int
    failed: int
    output: Path
    #: answered without an error but with an empty answer (the model ended first)
    empty: int = 0


def answered_ids(output: Path, *, retry_errors: bool) -> set[str]:
    """Ids already in an output file (those with an error only when not retrying them)."""
    done: set[str] = set()
    if not output.exists():
        return done
    for line in output.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # a line cut by a crash while writing: it is answered again
            continue
        if record.get("error") and retry_errors:
            continue
        done.add(str(record.get("id")))
    return done


#: the fields of an output line that alm-kit writes; an input field of the same name is renamed
RESULT_FIELDS = ("id", "audio", "prompt", "text", "answer", "thought", "finish_reason", "error")


def _record(request: Request, result: Generation) -> dict:
    """The output line: the input's extra fields first (renamed ``input_<name>`` where they would
    shadow a result field), then the result, which always wins."""
    kept = {(f"input_{k}" if k in RESULT_FIELDS else k): v for k, v in request.meta.items()}
    return {**kept, "id": request.id, "audio": [str(a) for a in request.audio], "prompt": request.prompt,
            "text": result.text, "answer": result.answer, "thought": result.thought,
            "finish_reason": result.finish_reason, "error": result.error}


def generate_file(engine: InferenceEngine, source: str | Path, output: str | Path, params: GenerationConfig, *,
                  progress: bool = True, retry_errors: bool = False) -> FileReport:
    source, output = Path(source), Path(output)
    examples = read_manifest(source, "jsonl", require_response=False)
    ids = [e.id for e in examples]
    repeated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if repeated:
        raise ManifestError(f"{source}: ids must be unique to resume, repeated: {', '.join(repeated[:5])}")
    drop_partial_line(output)
    done = answered_ids(output, retry_errors=retry_errors)
    todo = [Request(audio=list(e.audio), prompt=e.prompt, id=e.id,
                    meta=e.meta if e.response is None else {"response": e.response, **e.meta})
            for e in examples if e.id not in done]
    if retry_errors and output.exists():
        # keep the good answers, drop the failed ones that are about to be retried
        keep = [line for line in output.read_text().splitlines()
                if line.strip() and _parses(line) and str(json.loads(line).get("id")) in done]
        output.write_text("".join(line + "\n" for line in keep))
    output.parent.mkdir(parents=True, exist_ok=True)
    failed = empty = 0
    with output.open("a") as sink:
        def write(batch: list[Request], results: list[Generation]) -> None:
            nonlocal failed, empty
            for request, result in zip(batch, results):
                sink.write(json.dumps(_record(request, result), ensure_ascii=False) + "\n")
                failed += result.error is not None
                empty += result.error is None and not result.answer
            sink.flush()

        engine.run(todo, params, progress=progress, on_batch=write)
    return FileReport(total=len(examples), skipped=len(examples) - len(todo), answered=len(todo) - failed,
                      failed=failed, output=output, empty=empty)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def drop_partial_line(output: Path) -> None:
    """A crash while writing can leave a last line without its newline: it is dropped (and answered again)."""
    if not output.exists():
        return
    text = output.read_text()
    if text and not text.endswith("\n"):
        output.write_text(text[: text.rfind("\n") + 1])
