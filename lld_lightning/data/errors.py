"""Data errors that name the file and line, and the policy/report for counted skips."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A problem in the user's data, with the file (and line) that holds it.

    Constructible from a single message string so that it survives being re-raised from a
    DataLoader worker process.
    """

    @classmethod
    def at(cls, path: str | Path, message: str, line: int | None = None) -> DataError:
        where = f"{path}:{line}" if line is not None else f"{path}"
        return cls(f"{where}: {message}")


@dataclass
class DataReport:
    """Counts of what a loader skipped or dropped, by reason, with a few examples each.

    Attributes:
        on_error: ``"raise"`` raises the first `DataError`; ``"skip"`` counts it and goes on.
        files: ``{path: (reason, message)}`` of the files counted by `skip_file`.
    """

    on_error: OnError = "raise"
    skipped: Counter = field(default_factory=Counter)
    dropped_duplicates: int = 0
    duplicate_files: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    converted: Counter = field(default_factory=Counter)
    files: dict[str, tuple[str, str]] = field(default_factory=dict)

    def error(self, reason: str, error: DataError, count: int = 1) -> None:
        """Raise ``error`` or, under ``on_error: skip``, count ``count`` items under ``reason``
        (e.g. every image of a skipped annotation file)."""
        if self.on_error == "raise":
            raise error
        self.count(reason, str(error), count)

    def count(self, reason: str, message: str, count: int = 1) -> None:
        """Count a harmless anomaly under ``reason`` whatever the policy (it never raises)."""
        self.skipped[reason] += count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(message)

    def skip_file(self, reason: str, path: str | Path, message: str) -> None:
        """Count the file ``path`` as skipped under ``reason`` once, however often it is met
        (an unreadable training image is met again every epoch); `files` keeps each one."""
        if str(path) in self.files:
            return
        self.files[str(path)] = (reason, message)
        self.count(reason, message)

    def duplicates(self, path: str | Path, count: int) -> None:
        """Record ``count`` exact duplicate rows dropped from ``path``."""
        if count:
            self.dropped_duplicates += count
            self.duplicate_files[str(path)] += count

    def merge(self, other: DataReport) -> None:
        self.skipped.update(other.skipped)
        self.files.update(other.files)
        self.dropped_duplicates += other.dropped_duplicates
        self.duplicate_files.update(other.duplicate_files)
        self.converted.update(other.converted)
        for reason, items in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(items[: max(0, 3 - len(mine))])

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary_lines(self) -> list[str]:
        """Human-readable lines: one per skip reason, duplicates and conversions."""
        lines = [f"skipped {n} ({reason}), e.g. {self.examples.get(reason, [''])[0]}"
                 for reason, n in sorted(self.skipped.items())]
        if self.dropped_duplicates:
            lines.append(
                f"dropped {self.dropped_duplicates} duplicate rows in "
                f"{len(self.duplicate_files)} files"
            )
        lines += [f"converted {n} {kind} images to RGB" for kind, n in sorted(self.converted.items())]
        return lines


def error_message(error: BaseException) -> str:
    """The message of ``error`` without the worker traceback torch wraps around it.

    An exception raised in a DataLoader worker is re-raised in the main process as the same type,
    its message replaced by ``"Caught X in DataLoader worker process N. Original Traceback ..."``;
    the original message is the text after the traceback's last ``module.X: `` line.
    """
    text = str(error)
    if "Original Traceback" not in text:
        return text
    kind = type(error)
    for name in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        index = text.rfind("\n" + name)
        if index >= 0:
            return text[index + 1 + len(name) :].strip()
    return text.strip().splitlines()[-1]
