"""Shared pytest setup for tests/ (no conftest at the repo root: see DESIGN.md).

Without a CUDA device, Triton kernels can only run in the CPU interpreter, and the interpreter
must be chosen before triton is first imported: set TRITON_INTERPRET=1 here in that case.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
