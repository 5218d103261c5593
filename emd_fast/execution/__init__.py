"""How an iteration runs, never what it computes: elementwise backends (reference / Triton), torch.compile, CUDA
graphs, torch.distributed, profiling."""
