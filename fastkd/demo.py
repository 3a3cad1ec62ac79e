"""``fastkd demo``: the tempered softmax, fastkd's first op, at work.

Shows how temperature softens a teacher's prediction into the soft targets of knowledge distillation,
then checks the Triton kernel against the float64 reference, forward and gradient. Without a GPU the
kernel runs in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import os

import torch


def _soft_targets_table(logits: torch.Tensor, temperatures: list[float]) -> list[str]:
    import fastkd

    lines = [f"{'T':>4}  {'p(top1)':>8}  {'p(top2)':>8}  {'p(top3)':>8}  {'entropy (nats)':>14}"]
    for t in temperatures:
        p = fastkd.tempered_softmax(logits, t)
        top = p.topk(3).values.tolist()
        entropy = -(p * p.log()).sum().item()
        lines.append(f"{t:>4g}  {top[0]:>8.4f}  {top[1]:>8.4f}  {top[2]:>8.4f}  {entropy:>14.4f}")
    return lines


def _kernel_check(device: torch.device, dtype: torch.dtype, shape=(64, 1000), temperature=4.0) -> str:
    import fastkd

    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(shape, generator=gen)).to(device, dtype)
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    x_kernel = x.clone().requires_grad_()
    y = fastkd.tempered_softmax(x_kernel, temperature, backend="triton")
    y.backward(grad)
    x_exact = x.double().requires_grad_()
    y_exact = fastkd.tempered_softmax(x_exact, temperature, backend="torch")
    y_exact.backward(grad.double())
    dy = (y.double() - y_exact).abs().max().item()
    dx = (x_kernel.grad.double() - x_exact.grad).abs().max().item()
    return f"{str(dtype).removeprefix('torch.'):>9}  {dy:>14.2e}  {dx:>15.2e}"


def run() -> None:
    import fastkd

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when fastkd.kernels is first imported
    print(f"fastkd {fastkd.__version__}: the tempered softmax, softmax(z / T)  [device: {device}]\n")

    teacher_logits = torch.tensor([9.1, 6.3, 5.8, 2.0, 1.1, 0.4, -0.3, -1.2, -2.5, -4.0])
    print("A teacher's logits for one example of 10 classes, softened into soft targets:")
    print("\n".join(_soft_targets_table(teacher_logits.to(device), [1, 2, 4, 8])))
    print(
        "At T=1 the teacher is nearly one-hot; at T=4 the runner-up classes carry the 'dark knowledge'\n"
        "that Hinton-style distillation (KL at temperature T, scaled by T^2) passes to a student.\n"
    )

    try:
        import fastkd.kernels  # noqa: F401  (imports Triton)
    except ImportError:
        print("Triton is not installed: the kernel check is skipped (pip install triton).")
        return
    where = "compiled for the GPU" if device.type == "cuda" else "in Triton's interpreter on the CPU"
    print(f"The Triton kernel ({where}) against the float64 reference, 64 x 1000 logits, T=4:")
    print(f"{'dtype':>9}  {'max |dy| fwd':>14}  {'max |dx| grad':>15}")
    for dtype in (torch.float32, torch.bfloat16):
        print(_kernel_check(device, dtype))
    print("\nNext: `make test` runs the test suite.")
