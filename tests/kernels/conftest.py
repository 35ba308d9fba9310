"""Kernel tests: without a GPU, Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before the kernel modules are imported (they read it when their
kernels are decorated); test modules skip their kernel tests themselves when triton is missing.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
