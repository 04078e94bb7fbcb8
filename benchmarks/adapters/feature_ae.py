"""Evaluation adapter for feature_ae.py (see adapters/__init__.py for the contract)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from feature_ae import load_for_eval as load  # noqa: E402,F401  (transitional: moves here from feature_ae.py)
