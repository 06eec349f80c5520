"""Store[T]: mypy --strict accepts a typed example and catches wrong user code.

Runs the real mypy over ``examples/typed_player.py`` (clean) and over the
scripts in ``tests/typing_cases`` (each line marked ``# E:`` must be reported,
and nothing else).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted((ROOT / "tests" / "typing_cases").glob("*.py"))


def mypy(*paths: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_the_typed_example_is_clean() -> None:
    code, output = mypy(ROOT / "examples" / "typed_player.py")
    assert code == 0, output


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_wrong_user_code_is_caught(case: Path) -> None:
    expected = {
        number
        for number, line in enumerate(case.read_text().splitlines(), start=1)
        if "# E:" in line
    }
    assert expected, f"{case.name} marks no expected error"
    code, output = mypy(case)
    reported = {
        int(m.group(1)) for m in re.finditer(rf"{re.escape(case.name)}:(\d+): error", output)
    }
    assert code != 0, output
    assert reported == expected, output
