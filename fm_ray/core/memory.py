"""The memory plan of a greedy Fisher selection (FisherMask, BAIT): its large items, per process.

Pure arithmetic over sizes, so a run can be planned (and refused) before any work. The items and
their formulas follow what ``core.greedy`` and ``strategies.fisher`` allocate:

- on the largest shard: the stored Fisher embeddings ``S x c x d`` (``S`` its candidates, ``c``
  rows per sample, ``d`` the embedding width), the float64 partial sums (``d x d``, one or two),
  the block being computed, the fast greedy state (two ``c x c`` float64 per candidate) and the
  chunk that initializes it;
- on the driver: ``F`` and ``M^-1`` (``d x d`` float64), and a Cholesky factor while ``M_0^-1`` is
  computed without Woodbury (when the labeled rows ``n_L c`` are not below ``d``).

An item lives in some phases only (``predict``: the shards' forward pass over their members, which
every strategy that needs the model caches; ``embed``: the shards compute embeddings and sums;
``init``: ``M_0^-1`` and the shard states; ``select``: the greedy steps); a process's peak is the
largest sum over one phase. With the local backend the shards run inside the driver's process, so their items
add to the driver's (a partial sum becomes ``F`` in place: it is counted once, in its phase).
"""

from __future__ import annotations

from dataclasses import dataclass

from fm_ray.core.greedy import COLUMN_BLOCK, STEP_ROWS, STEP_TEMPORARIES, chunk_samples

SELECTION = ("embed", "init", "select")  # a strategy's own phases (an item's default)
PHASES = ("predict", *SELECTION)
_BLOCK = 256  # pool.shard.BLOCK: samples per embedding block

FIX_EMBED = "store them in bfloat16 (--embed-dtype bfloat16), use more --shards, --candidates N or --top-classes c"
FIX_DD = "lower --sparsity, or project the embeddings with --project r (the d x d state becomes r x r)"


@dataclass(frozen=True)
class Item:
    """One large allocation: ``nbytes`` on ``process`` (``driver`` or ``shard``: the largest one)
    in ``device`` memory (``ram`` or ``gpu``), alive in ``phases``; ``fix`` says how to shrink it."""

    process: str
    device: str
    name: str
    nbytes: int
    formula: str
    phases: tuple[str, ...] = SELECTION
    fix: str = ""


@dataclass(frozen=True)
class Plan:
    items: tuple[Item, ...]
    n_shards: int
    local: bool  # the shards run in the driver's process

    def peak(self, process: str, device: str) -> int:
        """Largest total over one phase of what ``process`` holds in ``device`` memory; for the local
        backend the driver's process also holds every shard's items."""
        best = 0
        for phase in PHASES:
            total = 0
            for it in self.items:
                if it.device != device or phase not in it.phases:
                    continue
                if it.process == process:
                    total += it.nbytes
                elif self.local and process == "driver" and it.process == "shard":
                    total += it.nbytes * self.n_shards
            best = max(best, total)
        return best

    def largest_process(self) -> tuple[str, str, int]:
        """(process, memory, peak) of the largest peak of any process (the driver's includes the
        shards' items with the local backend)."""
        peaks = [(self.peak(p, d), p, d) for p in ("driver", "shard") for d in ("ram", "gpu")]
        peak, process, device = max(peaks, key=lambda t: t[0])
        return process, device, peak

    def largest(self, process: str, device: str) -> Item:
        mine = [it for it in self.items if it.device == device and (it.process == process or self.local)]
        return max(mine, key=lambda it: it.nbytes)

    def text(self) -> str:
        """The plan as a table: one line per item, then each process's peak."""
        lines = [f"{'process':8s} {'memory':6s} {'size':>10s}  item (formula)"]
        for it in sorted(self.items, key=lambda it: (it.process, -it.nbytes)):
            lines.append(f"{it.process:8s} {it.device:6s} {human(it.nbytes):>10s}  {it.name} ({it.formula})")
        where = " (shards in this process)" if self.local else f" (each of {self.n_shards} shards)"
        for process in ("driver", "shard"):
            if self.local and process == "shard":
                continue
            for device in ("ram", "gpu"):
                peak = self.peak(process, device)
                if peak:
                    label = process + (where if process == "driver" and self.local else "")
                    label = label if process == "driver" else process + where
                    lines.append(f"peak {device} of {label}: {human(peak)}")
        return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


@dataclass(frozen=True)
class GreedySizes:
    """What the plan of one greedy selection depends on.

    Attributes:
        d: mask size (FisherMask) or ``C x E`` (BAIT): the width of the embeddings as computed.
        C: classes.
        shard_free: candidates on the largest shard (its unlabeled members, or its share of
            ``--candidates``).
        n_labeled, k: ``n_L`` and ``K``.
        rows: rows kept per sample (``--top-classes``; ``C`` by default).
        width: embedding width after ``--project r`` (``d`` by default).
        embed_bytes, compute_bytes: bytes per element of the stored embeddings and of the shards'
            arithmetic (4 for float32).
        labeled_init, method: ``--labeled-init``, ``--greedy``.
        shard_gpu, driver_gpu: where the shards and the driver compute.
        workspace: bytes of the Fisher passes' per-chunk workspace (``fisher_workspace``).
    """

    d: int
    C: int
    shard_free: int
    n_labeled: int
    k: int
    rows: int
    width: int
    embed_bytes: int = 4
    compute_bytes: int = 4
    labeled_init: bool = True
    method: str = "fast"
    shard_gpu: bool = False
    driver_gpu: bool = False
    workspace: int = 0

    @property
    def woodbury(self) -> bool:
        """``M_0^-1`` from the labeled rows by Woodbury: while they are fewer than the width."""
        return self.labeled_init and self.n_labeled * self.rows < self.width


def greedy_plan(z: GreedySizes, n_shards: int, local: bool) -> Plan:
    """The large items of one greedy Fisher selection (see the module docstring)."""
    S, c, r, C, d = z.shard_free, z.rows, z.width, z.C, z.d
    sh, dr = ("gpu" if z.shard_gpu else "ram"), ("gpu" if z.driver_gpu else "ram")
    dd = r * r * 8
    sums = 2 if z.labeled_init and not z.woodbury else 1
    chunk = min(S, chunk_samples(c, r, z.compute_bytes))
    items = [
        Item(
            "shard",
            sh,
            "Fisher embeddings",
            S * c * r * z.embed_bytes,
            f"S x c x d = {S} x {c} x {r} x {z.embed_bytes} B",
            fix=FIX_EMBED,
        ),
        Item(
            "shard",
            sh,
            "partial sums of V^T V",
            sums * dd,
            f"{sums} x d x d = {sums} x {r}^2 x 8 B",
            ("embed",),
            FIX_DD,
        ),
        Item(
            "shard",
            sh,
            "embedding block being computed",
            _BLOCK * C * d * (z.compute_bytes + 8),
            f"{_BLOCK} x {C} x {d} x ({z.compute_bytes} + 8) B",
            ("embed",),
        ),
        Item("driver", dr, "F (pool Fisher)", dd, f"d x d = {r}^2 x 8 B", ("init", "select"), FIX_DD),
        Item("driver", dr, "M^-1", dd, f"d x d = {r}^2 x 8 B", ("init", "select"), FIX_DD),
    ]
    if z.workspace:
        items.append(
            Item(
                "shard",
                sh,
                "Fisher passes' workspace (kept by the allocator)",
                z.workspace,
                "chunk x C x activations x 4 B x 1.5 (calibrated on the CNN)",
            )
        )
    if r != d:
        items.append(
            Item("shard", sh, "projection R", d * r * z.compute_bytes, f"{d} x {r} x {z.compute_bytes} B", ("embed",))
        )
    if z.labeled_init and not z.woodbury:
        items.append(
            Item(
                "driver",
                dr,
                "Cholesky factor of M_0",
                dd,
                f"d x d = {r}^2 x 8 B (n_L c >= d: no Woodbury)",
                ("init",),
                FIX_DD,
            )
        )
    if z.method == "fast":
        items.append(
            Item(
                "shard",
                sh,
                "fast greedy state",
                S * c * c * 8 * 2,
                f"S x 2 x c^2 x 8 B = {S} x 2 x {c}^2 x 8 B",
                ("init", "select"),
                FIX_EMBED,
            )
        )
        rows = min(S, STEP_ROWS)
        items.append(
            Item(
                "shard",
                sh,
                "greedy step temporaries (one block of candidates)",
                rows * c * c * 8 * STEP_TEMPORARIES,
                f"{rows} x c^2 x 8 B x {STEP_TEMPORARIES}",
                ("select",),
            )
        )
    else:
        items.append(
            Item(
                "shard",
                sh,
                "B and F on the shard (reference)",
                2 * r * r * z.compute_bytes,
                f"2 x {r}^2 x {z.compute_bytes} B",
                ("init", "select"),
                FIX_DD,
            )
        )
    items.append(
        Item(
            "shard",
            sh,
            "state initialization chunk",
            3 * chunk * c * r * z.compute_bytes + S * c * c * z.compute_bytes * 2 + r * COLUMN_BLOCK * z.compute_bytes,
            f"3 x {chunk} x {c} x {r} x {z.compute_bytes} B + A, N + one column block",
            ("init",) if z.method == "fast" else ("init", "select"),
        )
    )
    return Plan(tuple(items), n_shards, local)


def fisher_workspace(chunk_size: int, C: int, activations: int) -> int:
    """The Fisher diagonal's and embeddings' per-chunk workspace: every module's output, batched
    over the chunk and the C cotangents, in float32; the factor 1.5 (the allocator keeps freed
    blocks resident, and autograd keeps some twice) is calibrated by tests/test_memory_plan.py."""
    return int(chunk_size * C * activations * 4 * 1.5)


def shortfall(plan: Plan, free: dict[tuple[str, str], int]) -> str | None:
    """The first (process, memory) whose peak exceeds ``free[(process, memory)]``, as one line naming
    the largest item and its fix; None when everything fits (keys not in ``free`` are not checked)."""
    for (process, device), have in free.items():
        need = plan.peak(process, device)
        if need <= have:
            continue
        big = plan.largest(process, device)
        what = "GPU memory" if device == "gpu" else "RAM"
        fix = big.fix or FIX_DD
        return (
            f"the selection needs {human(need)} of {what} on the {process} but {human(have)} is free; "
            f"the largest item is {big.name} ({human(big.nbytes)}): {fix}, or run on a machine with more "
            f"{what}{'' if device == 'gpu' else ' or a GPU'}"
        )
    return None
