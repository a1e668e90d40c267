"""Per-sample, per-class Fisher quantities for FisherMask (Gul et al., arXiv 2411.05752).

For a sample ``x`` with ``p = softmax(f(x))`` the scaled gradient rows are
``g_c = sqrt(p_c) * d log p_c / d theta = J^T r_c`` with ``r_c = sqrt(p_c) (e_c - p)`` and
``J = d logits / d theta`` (the GGN square root; BAIT, Ash et al., NeurIPS 2021). Then
``sum_c g_c g_c^T`` is the per-sample Fisher, its diagonal feeds the mask (paper eq. 5) and the rows
restricted to the mask are the Fisher embeddings ``V_x`` (paper section III).

Approach: one forward per chunk of samples with hooks that record each layer's input, then one
backward vmapped over the ``C`` cotangents ``r_c`` (``is_grads_batched``) that returns the gradients
w.r.t. each layer's output only. Per-sample parameter gradients are rebuilt per layer in closed
form (Linear, Conv2d via unfold, eval-mode BatchNorm): one autograd call per chunk, not one per
(sample, class). For layers with few output positions ``L`` the diagonal uses ``sum_{n,c} (sum_l a_l b_l)^2 = sum_{n,l,m} (sum_c a_l a_m) b_l b_m``,
which avoids materialising the ``N x C x numel`` per-sample gradients. Parameters of any other module
fall back to ``torch.func`` (per-sample ``jacrev`` under ``vmap``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

Layout = list[tuple[str, int, torch.Size]]

# The Gram form of the diagonal costs ~L^2 per (o, i, n) against ~C L (+ squaring C per-sample
# grads) for the explicit form: use it while L <= _GRAM_FACTOR * C.
_GRAM_FACTOR = 1.0
# Bound (in elements) on the temporary of the masked-row gather.
_GATHER_ELEMS = 1 << 24
# Use a dense block matmul for masked rows when the touched block is at most this many times K.
_BLOCK_RATIO = 16


def param_layout(model: nn.Module) -> Layout:
    """The flat parameter layout: ``(name, numel, shape)`` in ``model.named_parameters()`` order.

    Mask indices everywhere index the concatenation of the flattened parameters in this order.
    """
    return [(name, p.numel(), p.shape) for name, p in model.named_parameters()]


def param_offsets(layout: Layout) -> list[int]:
    """Start offset of each parameter of ``layout`` in the flat concatenation (length len+1)."""
    offsets = [0]
    for _, numel, _ in layout:
        offsets.append(offsets[-1] + numel)
    return offsets


def class_residuals(logits_N_C: Tensor) -> Tensor:
    """``r[n, c, :] = sqrt(p_c) (e_c - p)`` so that ``g_c = J^T r_c``; returns ``(N, C, C)``."""
    return _residuals(torch.softmax(logits_N_C.detach(), dim=-1))


def _residuals(probs_N_C: Tensor) -> Tensor:
    eye_C_C = torch.eye(probs_N_C.shape[1], dtype=probs_N_C.dtype, device=probs_N_C.device)
    return probs_N_C.sqrt()[:, :, None] * (eye_C_C[None] - probs_N_C[:, None, :])


def last_layer_embeddings(probs_N_C: Tensor, feats_N_E: Tensor) -> Tensor:
    """Closed-form rows for a final bias-free Linear weight ``W`` (``C x E``), as BAIT uses.

    Row ``c`` is ``sqrt(p_c) kron(e_c - p, h)``, i.e. index ``c' * E + e`` holds
    ``sqrt(p_c) (delta_{c c'} - p_{c'}) h_e`` (row-major order of ``W``).

    Args:
        probs_N_C: softmax probabilities.
        feats_N_E: penultimate features ``h`` (the input of the final Linear).

    Returns:
        ``(N, C, C * E)`` embeddings.
    """
    N, C = probs_N_C.shape
    E = feats_N_E.shape[1]  # explicit: a shard may hold no sample (N = 0)
    return (_residuals(probs_N_C)[..., None] * feats_N_E[:, None, None, :]).reshape(N, C, C * E)


def _hookable(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    if isinstance(mod, nn.Conv2d):
        return mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
    return isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None


def _owners(model: nn.Module) -> tuple[dict[nn.Module, dict[str, str]], list[str]]:
    """Hookable modules -> {local param name: full name}, and the full names handled by torch.func."""
    full = {id(p): name for name, p in model.named_parameters()}
    seen: dict[int, int] = {}
    per_mod: dict[nn.Module, dict[str, str]] = {}
    for mod in model.modules():
        for local, p in mod.named_parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
            per_mod.setdefault(mod, {})[local] = full[id(p)]
    hooked = {m: names for m, names in per_mod.items() if _hookable(m)}
    hooked = {m: n for m, n in hooked.items() if all(seen[id(getattr(m, k))] == 1 for k in n)}
    done = {name for names in hooked.values() for name in names.values()}
    return hooked, [name for name in full.values() if name not in done]


@contextlib.contextmanager
def _grad_enabled_params(model: nn.Module) -> Iterator[None]:
    """Temporarily make every parameter require grad so the forward builds a graph."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def _layer_grads(
    model: nn.Module, x_n: Tensor, mods: list[nn.Module]
) -> tuple[Tensor, dict[nn.Module, tuple[Tensor, Tensor]], set[nn.Module]]:
    """One forward, then one backward, vmapped over the ``C`` cotangents, to the outputs of ``mods``.

    Returns:
        ``(r_n_C_C, {module: (input, grad_out_n_C_*)}, reused)``, where ``reused`` holds modules
        called more than once in the forward (their per-sample gradients are not rebuilt here).
    """
    acts: dict[nn.Module, tuple[Tensor, int, Tensor]] = {}
    reused: set[nn.Module] = set()

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
        if mod in acts:
            reused.add(mod)
        acts[mod] = (inp[0].detach(), inp[0]._version, out)
        # Clone so that in-place ops downstream (ReLU(inplace=True), +=) leave `out` intact.
        return out.clone()

    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        with _grad_enabled_params(model):
            logits_n_C = model(x_n)
            r_n_C_C = class_residuals(logits_n_C)
            live = [m for m in mods if m in acts and m not in reused]
            outs = [acts[m][2] for m in live]
            if not outs:
                return r_n_C_C, {}, reused
            # One vmapped backward for all C cotangents (is_grads_batched): (C, n, *out) per output.
            cot_C_n_C = r_n_C_C.transpose(0, 1).contiguous()
            g_out = torch.autograd.grad(logits_n_C, outs, cot_C_n_C, is_grads_batched=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    grads: dict[nn.Module, tuple[Tensor, Tensor]] = {}
    for m, g in zip(live, g_out, strict=True):
        a, version, out = acts[m]
        if a._version != version:
            raise RuntimeError(f"input of {type(m).__name__} was modified in place after use")
        g = g if g is not None else out.new_zeros((r_n_C_C.shape[1], *out.shape))
        grads[m] = (a, g.detach().transpose(0, 1))
    return r_n_C_C, grads, reused


def _factors(mod: nn.Module, a: Tensor, go: Tensor) -> tuple[Tensor, Tensor]:
    """``(go_n_C_O_L, u)`` with per-sample weight grads ``sum_l go[n,c,o,l] u[n,i,l]``.

    For BatchNorm ``u`` is ``x_hat`` with shape ``(n, n_out, L)`` and the weight grad is elementwise
    (``i = o``); bias grads are always ``go.sum(-1)``.
    """
    n, C = go.shape[:2]
    if isinstance(mod, nn.Linear):
        n_out, n_in = mod.out_features, mod.in_features
        u = a.reshape(n, -1, n_in).transpose(1, 2)
        return go.reshape(n, C, -1, n_out).transpose(2, 3), u
    if isinstance(mod, nn.Conv2d):
        pad = mod.padding
        u = F.unfold(a, mod.kernel_size, mod.dilation, pad, mod.stride)  # type: ignore[arg-type]
        return go.reshape(n, C, go.shape[2], -1), u
    assert isinstance(mod, nn.modules.batchnorm._BatchNorm)
    assert mod.running_mean is not None and mod.running_var is not None
    shape = (1, -1) + (1,) * (a.dim() - 2)
    x_hat = (a - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)
    return go.reshape(n, C, go.shape[2], -1), x_hat.reshape(n, a.shape[1], -1)


def _dense_weight_diag(go: Tensor, u: Tensor) -> Tensor:
    """``sum_{n,c} (sum_l go[n,c,o,l] u[n,i,l])^2`` as ``(n_out, n_in)``."""
    n, C, n_out, L = go.shape
    n_in = u.shape[1]
    if L <= _GRAM_FACTOR * C:
        gg = torch.einsum("ncol,ncom->nlmo", go, go).reshape(-1, n_out)
        uu = torch.einsum("nil,nim->nlmi", u, u).reshape(-1, n_in)
        return gg.T @ uu
    u_t = u.transpose(1, 2)
    out = go.new_zeros(n_out, n_in)
    for c in range(C):
        out += torch.bmm(go[:, c], u_t).square().sum(0)
    return out


def _dense_weight_rows(go: Tensor, u: Tensor, k: Tensor) -> Tensor:
    """Per-sample, per-class weight grads at sorted local flat indices ``k``: ``(n, C, K)``.

    When the masked entries cover a dense enough block (rows ``o`` x columns ``i`` touched), one
    matmul over that block beats an elementwise gather by far; otherwise gather.
    """
    n, C, n_out, L = go.shape
    n_in = u.shape[1]
    o, i = k // n_in, k % n_in  # o is sorted because k is
    uo, ui = o.unique(), i.unique()
    parts = []
    if uo.numel() * ui.numel() <= _BLOCK_RATIO * k.numel():
        u_n_L_Iu = u[:, ui].transpose(1, 2)[:, None]
        step = max(1, _GATHER_ELEMS // (n * C * ui.numel()))
        for s in range(0, uo.numel(), step):
            seg = uo[s : s + step]
            lo = int(torch.searchsorted(o, seg[0]))
            hi = int(torch.searchsorted(o, seg[-1], right=True))
            block = torch.matmul(go[:, :, seg], u_n_L_Iu)  # (n, C, seg, Iu)
            rows_o = torch.searchsorted(seg, o[lo:hi])
            parts.append(block[:, :, rows_o, torch.searchsorted(ui, i[lo:hi])])
        return torch.cat(parts, dim=2)
    step = max(1, _GATHER_ELEMS // (n * C * L))
    for s in range(0, k.numel(), step):
        parts.append(torch.einsum("nckl,nkl->nck", go[:, :, o[s : s + step]], u[:, i[s : s + step]]))
    return torch.cat(parts, dim=2)


def _vector_grads(mod: nn.Module, name: str, go_l: Tensor, u: Tensor) -> Tensor | None:
    """Full per-sample grads ``(n, C, numel)`` of a bias or a BatchNorm weight; None for a dense weight."""
    if name == "bias":
        return go_l.sum(-1)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return (go_l * u[:, None]).sum(-1)
    return None


def _module_rows(mod: nn.Module, a: Tensor, go: Tensor, local: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rows ``(n, C, K)`` for each local param name at the given local flat indices."""
    go_l, u = _factors(mod, a, go)
    out = {}
    for name, k in local.items():
        g = _vector_grads(mod, name, go_l, u)
        out[name] = g[..., k] if g is not None else _dense_weight_rows(go_l, u, k)
    return out


def _module_diag(mod: nn.Module, a: Tensor, go: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Flattened ``sum_{n,c} g^2`` for each local param name of ``mod``."""
    go_l, u = _factors(mod, a, go)
    out = {}
    for name in names:
        g = _vector_grads(mod, name, go_l, u)
        out[name] = g.square().sum((0, 1)) if g is not None else _dense_weight_diag(go_l, u).reshape(-1)
    return out


def _func_rows(model: nn.Module, x_n: Tensor, names: list[str], r_n_C_C: Tensor) -> dict[str, Tensor]:
    """Generic fallback: ``g_c = J^T r_c`` from per-sample ``jacrev`` under ``vmap``; ``(n, C, numel)``."""
    if not names:
        return {}
    params = {k: v.detach() for k, v in model.named_parameters()}
    sel = {k: params.pop(k) for k in names}
    rest = {**params, **dict(model.named_buffers())}

    def logits(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (p, rest), (x.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(logits), in_dims=(None, 0))(sel, x_n)  # name -> (n, C, *shape)
    return {k: torch.einsum("ncd,ndp->ncp", r_n_C_C, j.flatten(2)) for k, j in jac.items()}


def _check_eval(model: nn.Module) -> None:
    if any(m.training for m in model.modules()):
        raise ValueError("Fisher quantities need model.eval(): samples must be independent")


def fisher_diag_sum(
    model: nn.Module, x_N: Tensor, *, chunk_size: int = 32, out_dtype: torch.dtype = torch.float64
) -> Tensor:
    """Sum over samples of the per-sample Fisher diagonal, ``sum_x sum_c g_c(x)^2``.

    This is ``N`` times the diagonal Fisher of the paper's eq. 5 (arXiv 2411.05752), returned as a
    sum so that shards can add partial results; divide by the total sample count.

    Args:
        model: an eval-mode module mapping ``x`` to logits ``(N, C)``.
        x_N: inputs, batched along dim 0.
        chunk_size: samples per forward/backward (bounds memory).
        out_dtype: accumulation and output dtype.

    Returns:
        ``(n_params,)`` in the flat layout of :func:`param_layout`.
    """
    _check_eval(model)
    layout = param_layout(model)
    hooked, func_names = _owners(model)
    sums = {name: torch.zeros(numel, dtype=out_dtype, device=x_N.device) for name, numel, _ in layout}
    for s in range(0, x_N.shape[0], chunk_size):
        r_n_C_C, grads, reused = _layer_grads(model, x_N[s : s + chunk_size], list(hooked))
        extra = [full for m in reused for full in hooked[m].values()]
        for mod, (a, go) in grads.items():
            for local, d in _module_diag(mod, a, go, list(hooked[mod])).items():
                sums[hooked[mod][local]] += d.to(out_dtype)
        rows = _func_rows(model, x_N[s : s + chunk_size], func_names + extra, r_n_C_C)
        for name, g in rows.items():
            sums[name] += g.square().sum((0, 1)).to(out_dtype)
    return torch.cat([sums[name] for name, _, _ in layout])


def fisher_embeddings(model: nn.Module, x_N: Tensor, mask_idx_D: Tensor, *, chunk_size: int = 32) -> Tensor:
    """Fisher embeddings ``V_x``: row ``c`` is ``sqrt(p_c) d log p_c / d theta`` on the mask.

    Only parameter tensors holding masked entries are differentiated (arXiv 2411.05752, sec. III).

    Args:
        model: an eval-mode module mapping ``x`` to logits ``(N, C)``.
        x_N: inputs, batched along dim 0.
        mask_idx_D: sorted flat parameter indices (see :func:`param_layout`).
        chunk_size: samples per forward/backward (bounds memory).

    Returns:
        ``(N, C, D)`` in the model's dtype.
    """
    _check_eval(model)
    layout = param_layout(model)
    offsets = param_offsets(layout)
    mask_idx_D = mask_idx_D.to(torch.long).cpu()
    if mask_idx_D.numel() and not (
        mask_idx_D[0] >= 0 and mask_idx_D[-1] < offsets[-1] and bool((mask_idx_D.diff() > 0).all())
    ):
        raise ValueError(f"mask_idx_D must be strictly ascending flat indices in [0, {offsets[-1]})")
    bounds = torch.searchsorted(mask_idx_D, torch.tensor(offsets)).tolist()
    # full name -> (column slice in D, local flat indices)
    wanted = {
        name: (slice(bounds[j], bounds[j + 1]), (mask_idx_D[bounds[j] : bounds[j + 1]] - offsets[j]))
        for j, (name, _, _) in enumerate(layout)
        if bounds[j + 1] > bounds[j]
    }
    hooked, func_names = _owners(model)
    mods = [m for m, names in hooked.items() if any(n in wanted for n in names.values())]
    func_names = [n for n in func_names if n in wanted]
    chunks = []
    for s in range(0, x_N.shape[0], chunk_size):
        x_n = x_N[s : s + chunk_size]
        r_n_C_C, grads, reused = _layer_grads(model, x_n, mods)
        out = r_n_C_C.new_zeros(x_n.shape[0], r_n_C_C.shape[1], mask_idx_D.numel())
        for mod, (a, go) in grads.items():
            local = {k: wanted[full][1].to(go.device) for k, full in hooked[mod].items() if full in wanted}
            for k, rows in _module_rows(mod, a, go, local).items():
                out[:, :, wanted[hooked[mod][k]][0]] = rows
        extra = [full for m in reused for full in hooked[m].values() if full in wanted]
        for name, g in _func_rows(model, x_n, func_names + extra, r_n_C_C).items():
            out[:, :, wanted[name][0]] = g[..., wanted[name][1].to(g.device)]
        chunks.append(out)
    return torch.cat(chunks)
