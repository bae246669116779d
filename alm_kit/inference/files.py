"""Answer a JSON Lines file of examples into a JSON Lines file of answers, resumably.

Input lines are manifest records without a response (docs/data.md):
``{"id": "...", "audio": "a.wav" | ["a.wav", "b.wav"], "prompt": "..."}``; audio paths are
relative to the input file. Each output line repeats the id, audio and prompt and adds
``text``, ``answer``, ``thought``, ``finish_reason`` and ``error``; the input's other fields are kept,
and one whose name is a result field (a manifest's gold ``answer``, say) is kept as ``input_<name>``, so
the result fields are always the model's. A line that cannot be read (not JSON, a field missing)
fails alone: it gets an output line with its ``error`` and the ``line`` number. Answers are appended
after every batch, so an interrupted run loses at most one batch; a re-run skips the ids
already in the output (``retry_errors`` re-runs the ones that failed). When the run ends, the
output is rewritten in input order.

Under torchrun (:mod:`alm_kit.parallel`) every rank answers every N-th example into its own
``OUT.partR`` file; rank 0 then merges those into the output, in input order, so the result equals a
one-process run's. Part files left by an interrupted run are merged by the next run, on any number
of processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from alm_kit.config.schema import GenerationConfig
from alm_kit.data.manifest import BadLine, read_manifest, repeated_ids
from alm_kit.errors import ManifestError
from alm_kit.inference.engine import Generation, InferenceEngine, Request
from alm_kit.parallel import (
    Ranks,
    drop_partial_line,  # noqa: F401  (re-exported: alm-kit rephrase uses it)
    jsonl_rows,
    merge_parts,
    part_path,
)


@dataclass
class FileReport:
    total: int
    skipped: int
    answered: int
    failed: int
    output: Path
    #: rows of this input whose answer in the output is an error, this run's and earlier runs'
    failed_rows: int = 0
    #: answered without an error but with an empty answer (the model ended first)
    empty: int = 0

    def summary(self) -> str:
        text = (f"{self.output}: {self.answered} answered, {self.failed} failed, {self.skipped} already there "
                f"(of {self.total})")
        if self.failed_rows > self.failed:
            text += (f"; {self.failed_rows - self.failed} row(s) failed in an earlier run "
                     "(--retry-errors answers them again)")
        return text


def answered_ids(output: Path, *, retry_errors: bool) -> set[str]:
    """Ids already in an output file (those with an error only when not retrying them); a line cut by a
    crash while writing does not count (it is answered again)."""
    return {rid for rid, record, _ in jsonl_rows(output) if not (retry_errors and record.get("error"))}


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
                  progress: bool = True, retry_errors: bool = False, ranks: Ranks | None = None) -> FileReport:
    """Answer ``source`` into ``output``; under torchrun pass :func:`alm_kit.parallel.joined`'s ranks."""
    ranks = ranks or Ranks()
    source, output = Path(source), Path(output)
    bad: list[BadLine] = []
    examples = read_manifest(source, "jsonl", require_response=False, bad_lines=bad)
    # ids in input order; an example's source is "file:line"
    order = [rid for _, rid in sorted([(int(e.source.rpartition(":")[2]), e.id) for e in examples]
                                      + [(b.number, b.id) for b in bad])]
    repeated = repeated_ids(order)
    if repeated:
        raise ManifestError(f"{source}: ids must be unique to resume, repeated: {', '.join(repeated[:5])}")
    if ranks.is_main:
        output.parent.mkdir(parents=True, exist_ok=True)
        merge_parts(output)
        if retry_errors and output.exists():  # keep the good answers, drop the failed ones about to be retried
            output.write_text("".join(line + "\n" for _, record, line in jsonl_rows(output) if not record.get("error")))
    ranks.barrier()
    done = answered_ids(output, retry_errors=retry_errors)
    todo = [Request(audio=list(e.audio), prompt=e.prompt, id=e.id,
                    meta=e.meta if e.response is None else {"response": e.response, **e.meta})
            for e in examples if e.id not in done]
    unreadable = [b for b in bad if b.id not in done] if ranks.is_main else []
    failed, empty = len(unreadable), 0
    sink_path = part_path(output, ranks.rank) if ranks.enabled else output
    with sink_path.open("a") as sink:
        def write(records: list[dict]) -> None:
            sink.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
            sink.flush()

        def write_batch(batch: list[Request], results: list[Generation]) -> None:
            nonlocal failed, empty
            write([_record(request, result) for request, result in zip(batch, results)])
            failed += sum(result.error is not None for result in results)
            empty += sum(result.error is None and not result.answer for result in results)

        write([_unreadable_record(b) for b in unreadable])
        mine = ranks.share(todo)
        engine.run(mine, params, progress=progress and ranks.is_main, on_batch=write_batch)
    counts = ranks.gather((len(mine) + len(unreadable), failed, empty))
    asked, failed, empty = (sum(c[i] for c in counts) for i in (0, 1, 2))
    if ranks.is_main:
        merge_parts(output)
        in_input_order(output, order)
    ranks.barrier()
    return FileReport(total=len(order), skipped=len(order) - asked, answered=asked - failed, failed=failed,
                      output=output, failed_rows=_failed_rows(output, set(order)), empty=empty)


def _unreadable_record(bad: BadLine) -> dict:
    return {"id": bad.id, "line": bad.number, "audio": [], "prompt": None, "text": "", "answer": "",
            "thought": None, "finish_reason": "error", "error": bad.error}


def in_input_order(output: Path, order: list[str]) -> None:
    """Rewrite ``output`` with its rows in input order (rows of ids the input no longer has go last)."""
    rows = jsonl_rows(output)
    position = {rid: i for i, rid in enumerate(order)}
    ranked = sorted(rows, key=lambda row: position.get(row[0], len(order)))
    if ranked == rows:
        return
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(line + "\n" for _, _, line in ranked))
    os.replace(tmp, output)


def _failed_rows(output: Path, ids: set[str]) -> int:
    return sum(1 for rid, record, _ in jsonl_rows(output) if rid in ids and record.get("error"))
