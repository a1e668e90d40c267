"""Labeling projects: fm_ray picks, people label, fm_ray learns from their labels and picks again.

A project is one directory that holds everything:

    project.json                  pool source, class names, the run config, the hold-out fraction
    label_config.xml              the Label Studio labeling config: one single-choice control, `label`
    labels.csv                    id,label,batch: every label so far (rewritten atomically)
    counter.json                  the next batch number (rewritten atomically; folders may be deleted)
    sent.csv                      id,batch: every sample sent out (rewritten atomically): never sent again,
                                  even when its batch folder is deleted
    project.lock                  held by every command that writes (init, next, import): one at a time
    batches/<b>/batch.csv         id, path, rank, predicted, p_<class>...: what to label next
    batches/<b>/tasks.json        the same batch as Label Studio tasks (data.id, data.image, predictions)
    batches/<b>/summary.json      labels trained on, hold-out accuracy, seconds per phase
    batches/<b>/model.pt          the weights that picked batch b (state dict)
    batches/<b>/stop_preds.npy    the stop set's predicted classes under those weights (stopping criteria)
    batches/<b>/images/           PNGs of the batch when the pool has no image files of its own

`next` trains on every label so far (weights reset each round, as `fm-ray run`), then selects with
the project's strategy through the same `PoolSession` as `fm_ray.select`. Batch 0 (no labels yet)
is a seeded random sample: with the same pool, seed and settings a project makes the same picks as
`fm-ray run`, batch b being the run's round b - 1 query (with --init-strategy, batch 0 is that
strategy's pick from the seeded untrained model, as the run's initial set). Samples already sent out
are never sent again and count as labeled for the selection. An image removed from the pool's folder drops out:
unlabeled it is simply gone, labeled its label is left out of training with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from fm_ray._internal.files import check_folder_target, write_atomically
from fm_ray._internal.log import log
from fm_ray.config import RunConfig, from_dict, to_dict
from fm_ray.core.stopping import stop_set, verdicts
from fm_ray.data.registry import check_outside
from fm_ray.data.sources import load_pool, pool_ids
from fm_ray.errors import UserError
from fm_ray.project import labels as flabels
from fm_ray.project.labelstudio import label_config

FORMAT = 1


class Project:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta_path = self.path / "project.json"
        self.labels_path = self.path / "labels.csv"
        self.counter_path = self.path / "counter.json"
        self.sent_path = self.path / "sent.csv"

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the project's lock while a command writes: a second command waits for the first
        (saying so once), so two imports or two `next`s never interleave."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path / "project.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log(f"project {self.path} is busy (another fm-ray project command holds project.lock): waiting for it")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    # -- init ----------------------------------------------------------------------------------
    def init(self, cfg: RunConfig, classes: list[str], holdout: float) -> None:
        # before the lock, whose file would already be a write into the data folder
        check_outside(self.path, cfg.data.dataset, cfg.data.data_dir, "the project folder")
        check_folder_target(self.path, "DIR")
        with self.writing():
            self._init(cfg, classes, holdout)

    def _init(self, cfg: RunConfig, classes: list[str], holdout: float) -> None:
        if self.meta_path.exists():
            raise UserError(f"{self.path} already holds a project: use another DIR, or fm-ray project next {self.path}")
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise UserError(f"--classes {','.join(classes)}: give at least two distinct class names, e.g. cat,dog")
        if not 0 <= holdout < 1:
            raise UserError(f"--holdout must be in [0, 1), got {holdout}")
        from fm_ray.run.validate import check

        check(cfg)
        pool = load_pool(cfg)
        if pool.n_classes is not None and pool.n_classes != len(classes):
            raise UserError(f"the pool has {pool.n_classes} classes but --classes names {len(classes)}: name each")
        self.path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "classes": classes, "holdout": holdout, "config": to_dict(cfg)}
        _write_json(self.meta_path, meta)
        flabels.write_rows(self.labels_path, [], flabels.STORE_FIELDS)
        text = label_config(classes)  # Label Studio's labeling config, with fm_ray's own control name
        write_atomically(self.path / "label_config.xml", lambda f: f.write(text.encode()))
        log(f"project {self.path}: pool of {len(pool.ids)} ({cfg.data.dataset}), classes {', '.join(classes)}")

    @functools.cached_property
    def _meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError, RecursionError):
            raise UserError(
                f"{self.path} is not an fm_ray project (no readable project.json): run fm-ray project init"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(
                f"{self.meta_path} is not an fm_ray project file of format {FORMAT}: run fm-ray project init"
            )
        return meta

    def meta(self) -> dict[str, Any]:
        """project.json (written once by init; read once per Project)."""
        return self._meta

    @functools.cached_property
    def _config(self) -> RunConfig:
        return from_dict(self.meta()["config"])

    def config(self) -> RunConfig:
        return self._config

    def labels(self) -> list[dict[str, str]]:
        return flabels.read_rows(self.labels_path)

    def label_map(self) -> dict[str, str]:
        """labels.csv as id -> class, checked as an import is (it may have been edited by hand)."""
        return flabels.check_store(self.labels(), self.labels_path, self.meta()["classes"])

    def batches(self) -> list[int]:
        """The batch folders there are (an old one may have been deleted)."""
        d = self.path / "batches"
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []

    def next_batch(self) -> int:
        """The next batch number: the durable counter, never below a folder that exists or a batch
        sent.csv records (a crash between a batch's rename and the counter's write, a deleted counter)."""
        try:
            counted = int(json.loads(self.counter_path.read_text())["next_batch"])
        except FileNotFoundError:
            counted = 0
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{self.counter_path} is damaged: delete it (the batch folders tell the count)") from None
        recorded = {int(b) + 1 for b in self.sent_batches().values() if b.isdigit()}
        return max([counted, *(b + 1 for b in self.batches()), *recorded])

    def sent_batches(self) -> dict[str, str]:
        """Every id sent out for labeling -> its batch, in batch order: the record in sent.csv (a batch
        folder may be deleted) plus the batch folders (one written just before a crash)."""
        found = {r["id"]: r["batch"] for r in flabels.read_rows(self.sent_path)}
        for b in self.batches():
            for r in flabels.read_rows(self.path / "batches" / str(b) / "batch.csv"):
                found.setdefault(r["id"], str(b))
        return found

    def sent(self) -> list[str]:
        """Every id sent out for labeling, in batch order."""
        return list(self.sent_batches())

    def held_out(self, sample_id: str) -> bool:
        """Deterministic per id: a labeled sample is held out for evaluation with probability `holdout`."""
        frac = float(self.meta()["holdout"])
        h = hashlib.sha256(f"{self.config().seed}|{sample_id}".encode()).digest()
        return frac > 0 and int.from_bytes(h[:8], "big") / 2**64 < frac

    # -- import --------------------------------------------------------------------------------
    def import_labels(self, file: str | Path) -> int:
        """Validate every label in `file` against the pool, the classes and earlier labels; append
        the new ones atomically, under the project's lock. Returns how many were new (0 on a re-import)."""
        with self.writing():
            return self._import_labels(file)

    def _import_labels(self, file: str | Path) -> int:
        meta, rows, known = self.meta(), self.labels(), self.label_map()
        parsed = flabels.read_label_file(file)
        ids = set(pool_ids(self.config()))
        new = flabels.check_labels(parsed, known, ids, meta["classes"])
        batch_of = self.sent_batches()  # label id -> the batch that sent it out
        rows += [{"id": i, "label": lab, "batch": batch_of.get(i, "")} for i, lab in new.items()]
        flabels.write_rows(self.labels_path, rows, flabels.STORE_FIELDS)
        return len(new)

    # -- next ----------------------------------------------------------------------------------
    def next(self, k: int, image_url: str | None = None) -> Path:
        """Train on every label so far and write the next batch, under the project's lock."""
        with self.writing():
            return self._next(k, image_url)

    def _next(self, k: int, image_url: str | None = None) -> Path:
        from fm_ray.data.normalize import Normalizer
        from fm_ray.model.train import fit_round, predict, resolve_device
        from fm_ray.session import PoolSession
        from fm_ray.strategies import Selection

        meta, cfg = self.meta(), self.config()
        classes: list[str] = meta["classes"]
        pool = load_pool(cfg)
        b = self.next_batch()
        position = {i: p for p, i in enumerate(pool.ids)}
        labels = _in_pool(self.label_map(), position)
        sent = {i for i in self.sent() if i in position} | set(labels)  # removed images drop out
        free = len(pool.ids) - len(sent)
        if not 0 < k <= free:
            raise UserError(f"--k {k}: {free} pool samples are not yet sent out for labeling: pick 1..{free}")
        norm = Normalizer(pool.mean, pool.std)
        device = resolve_device(cfg.train.device)
        summary: dict[str, Any] = {"batch": b, "k": k, "strategy": cfg.strategy.name}
        probs, stop_preds = None, None
        if b == 0 or not labels:  # no model yet
            exclude = np.array(sorted(position[i] for i in sent), dtype=np.int64)
            sel, model = Selection(_first_picks(cfg, pool, k, exclude, b, len(classes), norm, device)), None
        else:
            train_ids = sorted((i for i in labels if not self.held_out(i)), key=position.__getitem__)
            if not train_ids:
                raise UserError("every label so far is held out for evaluation: label more samples, or lower --holdout")
            lab = np.array([position[i] for i in train_ids])
            y = torch.tensor([classes.index(labels[i]) for i in train_ids])
            log(f"batch {b}: training on {len(train_ids)} labels")
            model, fit = fit_round(
                cfg.model,
                cfg.train,
                cfg.seed,
                b - 1,
                pool.images.read(lab),
                y,
                norm,
                pool.augment,
                len(classes),
                device,
                desc=f"batch {b}",
            )
            summary |= {"n_train": len(train_ids), "train_epochs": fit["epochs"], "train_seconds": fit["train_seconds"]}
            summary |= self._holdout_accuracy(model, pool, labels, classes, norm, device)
            if summary["n_holdout"]:
                log(f"batch {b}: hold-out accuracy {summary['holdout_accuracy']:.4f} on {summary['n_holdout']} labels")
            elif float(meta["holdout"]) > 0:
                log(f"batch {b}: hold-out accuracy: none yet (no label held out so far)")
            start = time.perf_counter()
            session = PoolSession(pool.images, pool.ids, len(classes), norm, cfg.model, cfg.pool, str(device))
            try:
                stopping, stop_preds = self._stopping(b, session, model, sorted(sent), len(labels), len(classes), cfg)
                sel = session.select(  # the labels: galaxy balances by them
                    model,
                    k,
                    sorted(sent),
                    cfg.strategy,
                    cfg.seed,
                    b - 1,
                    _classes_of(sorted(sent), labels, classes),
                    True,
                )
            finally:
                session.close()
            summary |= {"query_seconds": time.perf_counter() - start, **sel.timings, "stopping": stopping}
            probs, _ = predict(model, pool.images.read(np.array(sel.indices)), norm, device)
        return self._write_batch(b, pool, sel.indices, probs, classes, summary, model, image_url, stop_preds)

    def _stopping(
        self,
        b: int,
        session: Any,
        model: torch.nn.Module,
        sent: list[str],
        n_labels: int,
        n_classes: int,
        cfg: RunConfig,
    ) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
        """Every stopping criterion after batch b's training, on the project's stop set (logged);
        leaves the session's shards set up for the query (`prepared`)."""
        probs = session.member_probs(model, stop_set(len(session.ids), cfg.stop_set, cfg.seed), sent)
        preds = probs.argmax(1).numpy()
        found = verdicts(np.stack([*self._stop_history(b), preds]), probs, n_classes, n_labels, cfg.budget)
        _log_stopping(b, found, len(preds))
        return {n: {"value": None if math.isnan(v) else v, "holds": h} for n, (h, v) in found.items()}, preds

    def _stop_history(self, b: int) -> list[np.ndarray]:
        """The stop set's predictions of the batches before b that picked with a model, oldest first
        (a deleted batch folder drops out)."""
        paths = [self.path / "batches" / str(i) / "stop_preds.npy" for i in range(1, b)]
        return [np.load(p, allow_pickle=False) for p in paths if p.exists()]

    def _holdout_accuracy(self, model, pool, labels, classes, norm, device) -> dict[str, Any]:
        from fm_ray.model.train import predict

        held = [i for i in labels if self.held_out(i)]
        if not held:
            return {"n_holdout": 0, "holdout_accuracy": None}
        pos = {i: p for p, i in enumerate(pool.ids)}
        probs, _ = predict(model, pool.images.read(np.array([pos[i] for i in held])), norm, device)
        truth = torch.tensor([classes.index(labels[i]) for i in held])
        return {"n_holdout": len(held), "holdout_accuracy": float((probs.argmax(1) == truth).float().mean())}

    def _write_batch(self, b, pool, picks, probs, classes, summary, model, image_url, stop_preds) -> Path:
        """Everything for batch b in a temporary folder, renamed into place: a crash leaves no half batch."""
        final = self.path / "batches" / str(b)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{b}."))
        try:
            rows, tasks = [], []
            for rank, p in enumerate(picks):
                sid = pool.ids[p]
                path = (
                    pool.paths[p]
                    if pool.paths is not None
                    else _export_png(pool.images.read(np.array([p]))[0], tmp, sid, final)
                )
                row: dict[str, Any] = {"id": sid, "path": path, "rank": rank, "predicted": ""}
                row |= {f"p_{c}": "" for c in classes}
                task: dict[str, Any] = {"data": {"id": sid, "image": _image_url(path, image_url, sid), "rank": rank}}
                if probs is not None:
                    pc = probs[rank]
                    row |= {
                        "predicted": classes[int(pc.argmax())],
                        **{f"p_{c}": f"{float(v):.6f}" for c, v in zip(classes, pc, strict=True)},
                    }
                    task["data"] |= {"predicted": row["predicted"], "probability": float(pc.max())}
                    task["predictions"] = [
                        {
                            "model_version": f"fm_ray-batch-{b}",
                            "score": pick_score(rank, len(picks)),
                            "result": [
                                {
                                    "from_name": flabels.CONTROL,
                                    "to_name": "image",
                                    "type": "choices",
                                    "value": {"choices": [row["predicted"]]},
                                }
                            ],
                        }
                    ]
                rows.append(row)
                tasks.append(task)
            flabels.write_rows(
                tmp / "batch.csv", rows, ["id", "path", "rank", "predicted", *(f"p_{c}" for c in classes)]
            )
            _write_json(tmp / "tasks.json", tasks)
            _write_json(tmp / "summary.json", summary)
            if model is not None:
                torch.save(model.state_dict(), tmp / "model.pt")
            if stop_preds is not None:
                np.save(tmp / "stop_preds.npy", stop_preds)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # the record of what was sent, which deleting the batch folder does not undo (before the counter:
        # a crash in between leaves the folder, which `sent_batches` reads too)
        sent = [{"id": i, "batch": bb} for i, bb in self.sent_batches().items()]
        flabels.write_rows(self.sent_path, sent, ("id", "batch"))
        _write_json(self.counter_path, {"next_batch": b + 1})
        log(f"batch {b}: {len(picks)} samples to label -> {final / 'batch.csv'} and tasks.json")
        return final

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        meta, labels = self.meta(), self.label_map()
        per_class = {c: sum(lab == c for lab in labels.values()) for c in meta["classes"]}
        batches = self.batches()
        last = {}
        if batches:
            last = json.loads((self.path / "batches" / str(batches[-1]) / "summary.json").read_text())
        pending = len(set(self.sent()) - set(labels))
        return {
            "labels": len(labels),
            "per_class": per_class,
            "batches": len(batches),
            "pending": pending,
            "holdout_labels": sum(self.held_out(i) for i in labels),
            "holdout_accuracy": last.get("holdout_accuracy"),
        }


def _first_picks(
    cfg: RunConfig, pool: Any, k: int, exclude: np.ndarray, b: int, n_classes: int, norm: Any, device: Any
) -> list[int]:
    """A batch picked with no labels: by --init-strategy from the seeded untrained model (or --features),
    as `fm-ray run`'s cold start; else a seeded random sample (among the samples not in `exclude`,
    those sent out or labeled without a batch)."""
    from fm_ray.data.settings import initial_labeled

    if cfg.init_strategy is None:
        picks = initial_labeled(len(pool.ids), k, cfg.seed)
        if exclude.size:  # labels imported without a batch: draw among the rest
            rng = np.random.default_rng([cfg.seed, 1, b])
            picks = np.sort(rng.choice(np.setdiff1d(np.arange(len(pool.ids)), exclude), size=k, replace=False))
        return [int(p) for p in picks]
    from fm_ray.model.train import round_seed
    from fm_ray.model.zoo import build_model
    from fm_ray.session import PoolSession

    torch.manual_seed(round_seed(cfg.seed, 0))
    channels, _, side = pool.images.shape
    model = build_model(cfg.model, channels, side, n_classes)
    session = PoolSession(pool.images, pool.ids, n_classes, norm, cfg.model, cfg.pool, str(device))
    try:
        strategy = dataclasses.replace(cfg.strategy, name=cfg.init_strategy)
        return session.select(model, k, [pool.ids[i] for i in exclude], strategy, cfg.seed, 0).indices
    finally:
        session.close()


def _classes_of(ids: list[str], labels: dict[str, str], classes: list[str]) -> list[int]:
    """The class index of each id's label; -1 for one sent out and not labeled yet."""
    return [classes.index(labels[i]) if i in labels else -1 for i in ids]


def _log_stopping(b: int, found: dict[str, tuple[bool, float]], n: int) -> None:
    values = ", ".join(
        f"{name} {'-' if math.isnan(value) else f'{value:.4g}'}" + (" (holds)" if holds else "")
        for name, (holds, value) in found.items()
    )
    log(f"batch {b}: stopping criteria on {n} pool samples: {values}")
    held = [name for name, (holds, _) in found.items() if holds and name != "budget"]
    if held:
        log(f"batch {b}: {' and '.join(held)} hold(s): labeling more is unlikely to change the model")
    if found["budget"][0]:
        log(f"batch {b}: the --budget of labels is spent")


def pick_score(rank: int, k: int) -> float:
    """Label Studio's prediction score of the rank-th pick of k: 1 - rank / k, so sorting by score
    (descending) gives fm_ray's pick order; the model's probability is in data.probability."""
    return 1 - rank / k


def _in_pool(labels: dict[str, str], position: dict[str, int]) -> dict[str, str]:
    """The labels of ids still in the pool; a warning names those whose image is gone."""
    gone = [i for i in labels if i not in position]
    if gone:
        log(
            f"warning: {len(gone)} labeled image(s) no longer in the pool are left out: {', '.join(gone[:5])}"
            + (" ..." if len(gone) > 5 else "")
            + " (put the file(s) back to use their labels)"
        )
    return {i: lab for i, lab in labels.items() if i in position}


def _export_png(image_u8: torch.Tensor, tmp: Path, sid: str, final: Path) -> str:
    """A PNG of one pool image for annotators (the pool has no files of its own); path as it will be."""
    from PIL import Image

    name = hashlib.sha1(sid.encode()).hexdigest()[:16] + ".png"  # ids may hold any character
    (tmp / "images").mkdir(exist_ok=True)
    arr = image_u8.permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(tmp / "images" / name)
    return str((final / "images" / name).resolve())


def _image_url(path: str, prefix: str | None, sid: str) -> str:
    """`--image-url PREFIX`: PREFIX + id; default: Label Studio's local-files URL for the path."""
    if prefix:
        return prefix + sid
    return "/data/local-files/?d=" + path.lstrip("/")


def _write_json(path: Path, obj: Any) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))
