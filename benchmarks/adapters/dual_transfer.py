"""Evaluation adapter for dual_transfer.py (see adapters/__init__.py for the contract)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dual_transfer import load_for_eval as load  # noqa: E402,F401  (transitional: moves here from dual_transfer.py)
