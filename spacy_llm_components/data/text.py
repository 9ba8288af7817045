"""Reading text files strictly: UTF-8 (a BOM is allowed), errors that name the line."""

from pathlib import Path
from typing import Iterator, Tuple, Union

from .errors import DataError


def read_text(path: Union[str, Path]) -> str:
    """The file's text; a byte that is not UTF-8 is reported with its line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file does not exist" if not path.exists() else "not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            path, f"line {line}", f"not UTF-8 (byte 0x{data[err.start]:02x} at column {err.start - line_start + 1}); "
            "re-save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(path, None, "file is empty")
    return text


def numbered_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(1-based line number, line without its line ending), for LF and CRLF files."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.rstrip("\r")


def decode_line(path: Path, number: int, raw: bytes) -> str:
    """One line of a file read as bytes (streaming), decoded as UTF-8 (a BOM is allowed on line 1);
    a byte that is not UTF-8 is reported with its line and column."""
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"line {number}", f"not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1}); re-save the file as UTF-8") from None
