"""fastkd's backends: one module each, implementing the same contract, found through the registry
(``fastkd._backend``). Nothing outside the registry compares backend names.

The contract: a module with ``NAME`` (the registered name) and these functions. Every argument has
been checked by the op that calls them (``fastkd._validate``, ``fastkd._options``); row tensors are
(N, V) with a unit column stride (any row stride, 0 included); targets (N,) int32/int64, contiguous;
a temperature is a float or a tensor of one value (0-d) or one per row ((N,), any stride); outputs
are allocated by the caller (``fastkd._host``) and written in place. Math runs in float32 for
float16/bfloat16/float32 inputs (float64 for float64, where the backend takes it).

``tempered_softmax_forward(x, temperature, log, y, stats)``
    y (N, V) in x's dtype: softmax(x / T) or its log; stats, when it has N rows, (N, 2) float32:
    (max_j x_j, ln sum_j e^((x_j - max x) / T)), what the backward needs for dL/dT.
``tempered_softmax_backward(grad, saved, temperature, stats, log, dx, dt)``
    grad (N, V) = dL/dy; ``saved`` the logits x (with ``stats``) when dt is wanted, else the output y.
    dx (N, V) in saved's dtype, or None; dt (N,) float32 dL/dT per row, or None.
``kd_loss_forward(student, teacher, target, options, out)``
    student (N, V), teacher (K, N, V), target (N,) or None, ``options`` a bound ``KDOptions``, ``out``
    a ``fastkd._host.KDOutputs``: writes out.rows and, when out.grad has rows, out.grad (module doc of
    ``kernels/kd_loss.py`` for the math; ``KDOutputs`` for the scales).
``kd_loss_topk_forward(student, indices, values, target, options, out)``
    the same for a sparse teacher: indices and values (N, k), ``options.tail`` its tail.
``scale_grad_(grad, grad_output)``
    grad (N, V) *= grad_output (0-d, or (N,) one per row), in place; free where grad_output is 1.
Optional, the loss split in two (``fastkd._ops.kd_split``; a backend without ``kd_loss_split`` always
runs ``kd_loss_forward`` then ``scale_grad_``, as the cpu, cuda and torch backends do):
``kd_loss_split(student, teacher, target, options)``
    whether these rows run split (shapes and options only; traced by ``torch.compile``); then
``KD_STATS``, the float32 statistics per row that the forward keeps for the backward, and
``kd_loss_stats_forward(student, teacher, target, options, out, stats)``
    writes out.rows (out.grad has no rows) and stats (N, KD_STATS);
``kd_loss_grad_backward(student, teacher, target, options, out, stats, grad_output, grad)``
    grad (N, V) = dL/dx times the reduction's scale (out.scale_tensor, else out.scale) times
    grad_output (0-d, or (N,) one per row), from the same student, teacher, target and options.
``calibration_pass(logits, target, mode, temperature, probs, ignore_index, n_bins)``
    one read of logits (N, C): a dict of float64 sums and int64 counts (``kernels/calibration.py``).
``fidelity_pass(student, teacher, temperature)``
    student (N, C), teacher (K, N, C): (rows whose top-1 classes agree, int64 0-d; sum of the rows'
    KL(p || q), float64 0-d).
"""

def kernels_cover(options, divergences, softcap: bool = False) -> bool:
    """Whether a kernel that implements ``divergences`` (names), and logit soft-capping when ``softcap``,
    runs these KD options. What a kernel backend's kernels do not implement (today: DKD and soft-capping
    in the experimental CUDA kernels; the Triton and C++ kernels run every divergence, the sparse
    teacher's all but DKD, which a sparse teacher does not define) runs that backend's fallback (the
    PyTorch backend's closed form, loss and gradient written into the same outputs)."""
    return options.divergence in divergences and (softcap or options.softcap is None)
