"""Errors for bad input records, and the policy that either raises or skips them."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union


@dataclass(frozen=True)
class BadRecord:
    """Where a record is and what is wrong with it. `where` is 'line N' or 'record N'."""

    path: str
    where: Optional[str]
    problem: str

    def __str__(self) -> str:
        return f"{self.path}{', ' + self.where if self.where else ''}: {self.problem}"

    def to_dict(self) -> Dict[str, Optional[str]]:
        return asdict(self)


class DataError(ValueError):
    """Input data that cannot be read: the message names the file, the line or record, and the problem."""

    def __init__(self, path: Union[str, Path], where: Optional[str], problem: str) -> None:
        self.record = BadRecord(str(path), where, problem)
        super().__init__(str(self.record))


class BadRecords:
    """Collects bad records when skipping is on; raises the first one when it is off."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.records: List[BadRecord] = []

    def report(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.records.append(err.record)

    def __len__(self) -> int:
        return len(self.records)
