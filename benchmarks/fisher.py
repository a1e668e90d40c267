"""Fisher diagonal + embeddings: batched (fm_ray.core.fisher) vs. the reference per-(sample, class) loop.

Run: python -m benchmarks.fisher --model resnet18 --batch 64 --samples 64 [--device cpu|cuda] [--classes 10]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor, nn

from benchmarks.timing import timed
from fm_ray.core.fisher import fisher_diag_sum, fisher_embeddings
from fm_ray.core.mask import fisher_mask, mask_size


def make_model(name: str, classes: int, device: str) -> nn.Module:
    if name != "resnet18":
        raise ValueError(f"unknown model {name!r}")
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=classes).to(device).eval()


def make_inputs(n: int, device: str, seed: int = 0) -> Tensor:
    """Seeded random 32x32 RGB images (swap in real CIFAR images here)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen).to(device)


def loop_reference(model: nn.Module, x_N: Tensor, mask_idx_D: Tensor) -> tuple[Tensor, Tensor]:
    """What the reference code does: one batch forward, one autograd call per (sample, class)."""
    params = list(model.parameters())
    logp_N_C = torch.log_softmax(model(x_N), dim=-1)
    N, C = logp_N_C.shape
    diag = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=x_N.device)
    emb_N_C_D = logp_N_C.new_zeros(N, C, mask_idx_D.numel())
    for n in range(N):
        for c in range(C):
            grads = torch.autograd.grad(logp_N_C[n, c], params, retain_graph=True)
            row = logp_N_C[n, c].detach().exp().sqrt() * torch.cat([g.reshape(-1) for g in grads])
            diag += row.double().square()
            emb_N_C_D[n, c] = row[mask_idx_D]
    return diag, emb_N_C_D


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=64, help="chunk size of the batched implementation")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--loop-samples", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--sparsity", type=float, default=0.002)
    ap.add_argument("--repeats", type=int, default=1, help="time the batched path this often, keep the min")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = make_model(args.model, args.classes, args.device)
    x_N = make_inputs(args.samples, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    fisher_embeddings(model, x_N[:2], torch.arange(10))  # warm-up

    def batched() -> tuple[Tensor, Tensor]:
        diag = fisher_diag_sum(model, x_N, chunk_size=args.batch)
        mask = fisher_mask(diag, mask_size(n_params, args.sparsity))
        return mask, fisher_embeddings(model, x_N, mask, chunk_size=args.batch)

    runs = [timed(args.device, batched) for _ in range(args.repeats)]
    batched_s, (mask, emb_N_C_D) = min(runs, key=lambda r: r[0])
    x_loop = x_N[: args.loop_samples]
    loop_s, (loop_diag, loop_emb) = timed(args.device, lambda: loop_reference(model, x_loop, mask))
    diag_loop_samples = fisher_diag_sum(model, x_loop, chunk_size=args.batch)
    err = max(_rel(diag_loop_samples, loop_diag), _rel(emb_N_C_D[: args.loop_samples], loop_emb))
    loop_per, batched_per = loop_s / len(x_loop), batched_s / len(x_N)
    result = {
        "bench": "fisher",
        "model": args.model,
        "batch": args.batch,
        "samples": args.samples,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "loop_s_per_sample": round(loop_per, 5),
        "batched_s_per_sample": round(batched_per, 5),
        "speedup": round(loop_per / batched_per, 2),
        "max_rel_err": float(f"{err:.3g}"),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
