"""The CSV files a user hands to dermwatch (labelled photos, confirmed outcomes), read one way."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from dermwatch.errors import DataError


def read_table(table: Path, columns: str, has_columns: Callable[[set[str]], bool]) -> list[tuple[int, dict[str, str]]]:
    """Each row with its line number as a spreadsheet shows it (the header is line 1).

    ``columns`` says in words which columns are needed; ``has_columns`` checks the header.
    A missing column, a file that is not UTF-8 or not CSV is one DataError naming the file.
    """
    try:
        with table.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets often add a BOM
            reader = csv.DictReader(handle)
            header = set(reader.fieldnames or ())
            if not has_columns(header):
                raise DataError(f"{table}: needs the columns {columns}; has {', '.join(sorted(header)) or 'none'}")
            return list(enumerate(reader, start=2))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{table}: cannot be read ({error})") from None
