"""The LoRA update inside the base GEMM: [x | h] @ [W | bt^T]^T, one GEMM per linear instead of two passes over
its output, for the groups of linears whose outputs are much wider than their input (gate/up).

The problem. `fused_lora` computes a LoRA linear's output as the rank-r update h @ bt written to the output,
then the base GEMM accumulating x @ W^T onto it (cuBLAS reads the output back in its epilogue). For gate/up at
7B that is a write and a read of [tokens, 18,944] per member beyond the base GEMM's own write: ~0.9 GB a member
at 4 x 3072 tokens, ~17 ms of a ~0.7 s micro-batch on an H100 for the two members of 28 layers by bandwidth.
In the backward, dh = g @ bt reads each member's output gradient g once more (~9 ms). Appending h to the input and
bt^T to the weight as r more columns of the contraction gives the same sums in one GEMM each way:
    out_j = [x | h_1 .. h_G] @ Wc_j^T,  Wc_j = [W_j | 0 .. bt_j^T .. 0]   (member j's bt in slot j)
    [dx | dh_1 .. dh_G] = sum_j g_j @ Wc_j                                (dh_j lands in slot j)
at the price of copying x into [x | h] (one read and write of [tokens, K]) and, in the backward, dx out of
[dx | dh] (the dropout kernel adds into a dense dx). That pays where the members' outputs are at least twice as
wide as the input (`worth`): gate/up (2 x 18,944 against 3,584), not q/k/v, o or down.

The weight is not copied: Wc_j is allocated once with r * G spare columns, W_j is copied in and the frozen weight
becomes a view of its first K columns (a row stride of K + G r, which cuBLAS takes as its leading dimension), so
the model holds W once. Each forward writes bt_j^T (N x r) into its slot. A weight moved or replaced since (a
`.to()`, a new tensor) no longer shares the buffer's storage and gets a new buffer on its next call.

Why here: PEFT and Liger keep the two passes, and we know of no training library that appends a trainable B and a
dropout-masked h to the base GEMM's contraction. Measured on an H100 (benchmarks/NOTES.md, session 13): +0.3% at 7B
3 x 3072 (`train_throughput.py +concat`), ~+0.9% in the users' 7B command by difference, not the +2% the bytes above
predicted: cuBLAS hides most of its epilogue read behind the GEMM. So it is off (`enabled`); the 32B is unmeasured.
"""

from __future__ import annotations

import torch

# benchmarks switch it on for the A/B (`+concat`); measured too small a gain to be the default
enabled = False
_ATTR = "_mhsft_cat"  # on the frozen weight: (buffer [N, K + G r], G, slot j, r)


def worth(weights, k: int) -> bool:
    """Concatenate only where the outputs are at least twice as wide as the input (gate/up, not q/k/v)."""
    return enabled and sum(w.shape[0] for w in weights) >= 2 * k


def buffers(weights, r: int, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """Each member's [N_j, K + G r] buffer whose first K columns are its frozen weight, or None where a member is
    not a plain weight tensor of the input's dtype. Made on first use, and again where the weight no longer lives
    in its buffer (moved by `.to()`, replaced)."""
    if not all(type(w) is torch.nn.Parameter and w.dim() == 2 and w.dtype == dtype for w in weights):
        return None
    g = len(weights)
    out = []
    for j, w in enumerate(weights):
        cat = getattr(w, _ATTR, None)
        if cat is None or cat[1:] != (g, j, r) or not _holds(cat[0], w):
            cat = _adopt(w, g, j, r)
        out.append(cat[0])
    return out


def _holds(buf: torch.Tensor, w: torch.Tensor) -> bool:
    return w.data_ptr() == buf.data_ptr() and w.stride(0) == buf.stride(0) and w.shape[0] == buf.shape[0]


@torch.no_grad()
def _adopt(w: torch.nn.Parameter, g: int, j: int, r: int) -> tuple:
    n, k = w.shape
    buf = torch.zeros(n, k + g * r, device=w.device, dtype=w.dtype)
    buf[:, :k].copy_(w)
    w.data = buf[:, :k]  # the weight lives in the buffer from now on: held once
    cat = (buf, g, j, r)
    setattr(w, _ATTR, cat)
    return cat


def forward(x2: torch.Tensor, bufs, biases, hs, bts) -> list[torch.Tensor]:
    """out_j = x2 @ W_j^T + h_j @ bt_j (+ bias_j), one GEMM each over [x2 | h_1 .. h_G]."""
    m, k = x2.shape
    r = hs[0].shape[1]
    xh = torch.empty(m, k + len(hs) * r, device=x2.device, dtype=x2.dtype)
    xh[:, :k].copy_(x2)
    for j, h in enumerate(hs):
        xh[:, k + j * r : k + (j + 1) * r].copy_(h)
    _fill(bufs, bts, k, r)
    return [
        torch.mm(xh, buf.t()) if b is None else torch.addmm(b, xh, buf.t()) for buf, b in zip(bufs, biases)
    ]


def _fill(bufs, bts, k: int, r: int) -> None:
    # bt_j^T into slot j: B changes every optimizer step (and is written again in the backward, where a buffer made
    # anew since the forward would hold zeros)
    for j, (buf, bt) in enumerate(zip(bufs, bts, strict=True)):
        buf[:, k + j * r : k + (j + 1) * r].copy_(bt.t())


def input_grads(grads, bufs, bts, k: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [M, K] dense, dh [G, M, r]) = the parts of sum_j g_j @ Wc_j, accumulated by cuBLAS in one buffer."""
    _fill(bufs, bts, k, r)
    dxh = None
    for g, buf in zip(grads, bufs, strict=True):
        dxh = torch.mm(g, buf) if dxh is None else dxh.addmm_(g, buf)
    m = dxh.shape[0]
    dh = dxh[:, k:].reshape(m, len(bufs), r).transpose(0, 1).contiguous()
    return dxh[:, :k].contiguous(), dh
