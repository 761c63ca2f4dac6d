"""Shared test setup: one intra-op thread per test process (the suite runs on 2 shared cores;
tiny tensors are faster single-threaded, and pytest-xdist runs one process per core)."""
import torch

torch.set_num_threads(1)
