"""Shared test setup: import helper_functions from the repository root; draw figures without a display."""
import sys
from pathlib import Path

import matplotlib

# Only this pytest process: nbval's notebook kernels are separate processes and keep their inline backend.
matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
