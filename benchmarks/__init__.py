"""fastkd's benchmark suite: each op against PyTorch eager, ``torch.compile``, Liger-Kernel and torchmetrics.

``python -m benchmarks`` (``make bench``) runs ``cases`` on the present device (``runner``), timing
with ``timing``, and writes markdown, JSON and PNG results (``report``) to ``benchmarks/results/``.
"""
