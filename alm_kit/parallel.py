"""Data-parallel inference under ``torchrun``: which items are this process's, and the few
collectives that put the slices back together (``alm-kit generate --input``, ``alm-kit eval``).

``torchrun --nproc_per_node N -m alm_kit eval CKPT FILE`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`joined` then joins a process group, each rank answers every N-th item
(:meth:`Ranks.share`) on its own device (``cuda:LOCAL_RANK``), and rank 0 merges. Inference only
exchanges small Python objects (ids, answers, counts), so the group is gloo whatever the device.
Each rank appends its lines to a part file of the output (:func:`part_path`), which rank 0 folds in
(:func:`merge_parts`); a run interrupted on N processes resumes on any number.
Training has its own group and wrapping (alm_kit/training/distributed.py); this module sits low so
that inference and evaluation do not import the training package.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: how long a rank waits for the others at a merge point: the ranks of a long run finish at
#: different times; a rank that crashes ends the whole job through torchrun anyway
WAIT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the torchrun workers (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``size``-th, from the ``rank``-th (the slices interleave, so long
        and short items spread evenly over the ranks)."""
        return list(items[self.rank :: self.size])

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def device(self, name: str = "auto") -> str:
        """``--device`` for this rank: ``auto`` and a bare ``cuda`` mean ``cuda:LOCAL_RANK``."""
        from alm_kit.runtime import resolve_device

        return str(resolve_device(name, self.local_rank))


@contextmanager
def joined() -> Iterator[Ranks]:
    """The torchrun process group for the duration of a command (a single :class:`Ranks` without
    torchrun); an existing group, e.g. one the caller started, is used and left open."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield Ranks()
        return
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", timeout=WAIT)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- JSON Lines part files
def part_path(target: Path, rank: int) -> Path:
    """Where rank ``rank`` of a torchrun run appends the lines it would append to ``target``."""
    return target.with_name(f"{target.name}.part{rank}")


def jsonl_rows(path: Path) -> list[tuple[str, dict, str]]:
    """(id, record, line) of every complete line of ``path``; a line cut by a crash is left out."""
    if not path.exists():
        return []
    text = path.read_text()
    rows = []
    for line in text.splitlines()[: text.count("\n")]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            rows.append((str(record.get("id")), record, line))
    return rows


def merge_parts(target: Path, *, unique_ids: bool = True) -> None:
    """Fold the part files of a torchrun run (:func:`part_path`) into the JSON Lines file ``target``,
    then delete them; first drop a last line of ``target`` cut by a crash. With ``unique_ids``, a
    row whose id is already there is left out, so a merge interrupted halfway can run again."""
    drop_partial_line(target)
    parts = sorted(p for p in target.parent.glob(f"{glob.escape(target.name)}.part*") if p.suffix[5:].isdigit())
    if not parts:
        return
    have = {rid for rid, _, _ in jsonl_rows(target)} if unique_ids else set()
    with target.open("a") as sink:
        for part in parts:
            for rid, _, line in jsonl_rows(part):
                if unique_ids:
                    if rid in have:
                        continue
                    have.add(rid)
                sink.write(line + "\n")
        sink.flush()
        os.fsync(sink.fileno())
    for part in parts:
        part.unlink()


def drop_partial_line(output: Path) -> None:
    """A crash while writing can leave a last line without its newline: it is dropped (and answered again)."""
    if not output.exists():
        return
    text = output.read_text()
    if text and not text.endswith("\n"):
        output.write_text(text[: text.rfind("\n") + 1])
