"""The interior tests share the tiny model zoo of tests/runtime."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "runtime"))
