"""Dataset-scale studies: run a per-batch measurement over a data set, resumably and sharded.

A *study* applies a measurement (built on the patching engine, e.g. per-image indirect effects per
layer) to every image of a data set and keeps one row per image::

    def measure(model, images, labels):          # images: model input [batch, C, H, W]
        result = trace_layers(model, images, labels, ...)
        return {"effect": result.effects, "clean": result.clean_score}   # [batch, layer], [batch]

    results = run_study(model, "../shared/data/cifar10/test.tar.gz", measure, "runs/grayscale")
    effects = stack_column(results, "effect")    # [image, layer]

Storage: ``out`` is a directory. Every finished batch is written at once as its own Parquet
file ``rank{r}-part{k}.parquet`` (written to a hidden temporary file, then renamed, so a file
either holds a whole batch or does not exist). An interruption therefore loses at most the batches
in flight; calling ``run_study`` again with the same arguments skips every image already stored.
At the end the rows are merged, sorted by data set index, and written to ``out/results.parquet``.
The part files stay: they are the state a later run resumes from (e.g. to extend the study to more
images). One ``out`` directory holds one study: ``out/study.json`` records a digest of the model's
weights and the caller's ``settings``, and a run with another model or other settings is refused
rather than mixed into the stored rows.

Sharding: run the same script with ``torchrun --nproc_per_node=N script.py`` (or with any
initialised ``torch.distributed`` process group). Each rank takes a disjoint share of the images
still to do, and every rank returns the same merged results, equal to a one-process run.
See :func:`run_study`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from jaxtyping import Float, Int, Shaped
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from vitlens_patch.checks import check_positive_int
from vitlens_patch.data.folder import LabelledImages, load_image_folder

RESULTS_FILE = "results.parquet"
SETTINGS_FILE = "study.json"
RESERVED_COLUMNS = ("index", "label")
_PART_NAME = re.compile(r"rank(\d+)-part(\d+)\.parquet")

MeasureOutput = Mapping[str, Tensor | np.ndarray | Sequence]
Measure = Callable[..., MeasureOutput]


def run_study(
    model: nn.Module,
    dataset: Dataset | LabelledImages | str | os.PathLike,
    measure: Measure,
    out: str | os.PathLike,
    *,
    batch_size: int = 32,
    indices: Sequence[int] | Tensor | None = None,
    with_indices: bool = False,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    settings: Mapping | None = None,
    progress: bool = True,
    description: str = "study",
) -> pd.DataFrame:
    """Apply ``measure`` to every image of ``dataset``, storing rows as it goes; resumable.

    Args:
        model: passed unchanged to ``measure``; its ``preprocess`` method turns raw images into
            model input (only needed for raw images, see ``dataset``). Put it on its device and in
            eval mode first; under torchrun with GPUs, each rank puts it on ``cuda:{LOCAL_RANK}``.
        dataset: one of
            - a path to an ImageFolder-layout folder ``<class>/<image>`` or a ``.tar.gz`` archive of
              one, read into memory with :func:`vitlens_patch.data.folder.load_image_folder`
              (classes in alphabetical order; all images of one size);
            - a :class:`~vitlens_patch.data.folder.LabelledImages`;
            - any map-style torch Dataset whose items are ``(image, label)`` pairs. A floating-point
              tensor image is taken as model input, already preprocessed [C, H, W]; anything else
              (PIL image, uint8 tensor [C, H, W] or array [H, W, C]) goes through
              ``model.preprocess``, batch by batch. E.g. ``torchvision.datasets.ImageFolder(root)``
              without a transform reads a large folder lazily.
        measure: ``measure(model, images, labels) -> {name: values}`` with images the model input
            [batch, C, H, W] and labels int64 [batch], both on ``device``. Each value (Tensor,
            array or list) holds one entry per image: shape [batch] (a column) or [batch, k] (a
            list column; read it back with :func:`stack_column`). ``index`` and ``label`` are
            reserved names. For resumed and sharded runs to equal a plain run, an image's values
            must not depend on the other images of its batch (seed random corruptions per image:
            see ``with_indices``). The runner leaves the grad mode alone: wrap the measurement in
            ``torch.no_grad()`` unless it needs gradients.
        out: directory for the part files and ``results.parquet`` (created if missing).
        batch_size: images per call of ``measure``; also the unit of storage.
        indices: data set indices to study (default: all); see :func:`vitlens_patch.data.folder.select_per_class`. Results
            already stored for other indices are kept on disk but left out of the returned frame, so
            a study can be extended to a superset later without recomputation.
        with_indices: call ``measure(model, images, labels, indices=...)`` with the int64 data set
            indices [batch] of the images, e.g. to seed a noise corruption per image.
        device: where images and labels go (default: the device of the model's first parameter).
        num_workers: DataLoader worker processes loading images.
        settings: JSON-serialisable description of the measurement (e.g. a recipe's arguments),
            recorded in ``out/study.json`` with :func:`model_fingerprint` of ``model``. If ``out``
            already records other settings or another model, a ValueError names what differs.
        progress: show a tqdm progress bar (on rank 0 only, counting rank 0's images). A resumed
            run starts the bar at the images already stored: ``done / total``.
        description: the bar's label (recipes name themselves, e.g. "grayscale study (attn, window 3)").

    Returns:
        The results, one row per requested image sorted by ``index``: columns ``index`` (data set
        index), ``label``, then the measurement's names. Every rank returns the same frame.

    Distributed runs: if a ``torch.distributed`` process group is initialised, it is used (a
    gloo twin is created for the runner's messages when its backend is not gloo, e.g. NCCL).
    Otherwise, if the environment says ``WORLD_SIZE`` > 1 (as under ``torchrun``), the runner
    initialises a gloo group from the environment and keeps it for later calls (it is destroyed
    when the process exits). The images not yet stored anywhere are sorted and rank ``r`` takes
    every ``world``-th one, starting at the ``r``-th: disjoint, deterministic, balanced also when
    resuming. Each rank writes its own part files; the rows are merged with
    ``all_gather_object``, so ``out`` need not be a shared file system (with one, resuming may
    also change the number of processes). Only rank 0 writes ``results.parquet``. Ranks wait for
    each other at the start and at the end of the call (``torch.distributed``'s default timeout
    applies; if it expires, run again: the stored batches are kept).
    """
    check_positive_int(batch_size, "batch_size")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    dataset = _as_dataset(dataset)
    wanted = _check_indices(indices, len(dataset))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _claim_directory(out, {"model_sha256": model_fingerprint(model), **_as_json("settings", settings or {})})
    device = torch.device(device) if device is not None else _model_device(model)

    with _process_group() as (group, rank, world):
        stored = _read_parts(out)
        wanted_set = set(wanted)
        stored_here = [] if stored is None else sorted(set(stored["index"].tolist()) & wanted_set)
        # The lowest rank holding an image contributes its row: no duplicates, no shared disk.
        owner: dict[int, int] = {}
        for other_rank, done in enumerate(_all_gather(stored_here, group, world)):
            for index in done:
                owner.setdefault(index, other_rank)
        remaining = [index for index in wanted if index not in owner]
        kept = [] if stored is None else [stored[stored["index"].map(owner.get) == rank]]

        new = _measure_shard(
            model, dataset, measure, out, remaining[rank::world],
            batch_size=batch_size, with_indices=with_indices, device=device,
            num_workers=num_workers, columns=None if stored is None else list(stored.columns),
            rank=rank, world=world, progress=progress, description=description,
            done=len(wanted) - len(remaining),
        )
        frames = [frame for of_rank in _all_gather(kept + new, group, world) for frame in of_rank]
    results = pd.concat(frames, ignore_index=True) if frames else _empty_frame(stored)
    results = results.sort_values("index", kind="stable").reset_index(drop=True)
    if rank == 0:
        _write_atomic(results, out / RESULTS_FILE)
    return results


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 hex digest of a model's state dict: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_study(out: str | os.PathLike) -> pd.DataFrame:
    """Every row stored in a study directory so far (also while it runs), sorted by ``index``.

    Args:
        out: the ``out`` directory of :func:`run_study`.

    Returns:
        One row per stored image: ``index``, ``label`` and the measurement's columns.
    """
    stored = _read_parts(Path(out))
    if stored is None:
        raise ValueError(
            f"out must be a study directory holding rank*-part*.parquet files, got {str(out)!r}"
        )
    return stored


def stack_column(results: pd.DataFrame, column: str) -> Shaped[Tensor, "batch *k"]:
    """One column of study results as a tensor: [image], or [image, k] for a list column.

    Args:
        results: a frame from :func:`run_study` or :func:`read_study`.
        column: name of a numeric column.

    Returns:
        Tensor [image] or [image, k], rows in the frame's order.
    """
    if column not in results.columns:
        raise ValueError(f"column must be one of {list(results.columns)}, got {column!r}")
    return torch.from_numpy(np.stack(results[column].to_numpy()))


def _measure_shard(
    model: nn.Module,
    dataset: Dataset,
    measure: Measure,
    out: Path,
    shard: list[int],
    *,
    batch_size: int,
    with_indices: bool,
    device: torch.device,
    num_workers: int,
    columns: list[str] | None,
    rank: int,
    world: int,
    progress: bool,
    description: str,
    done: int,
) -> list[pd.DataFrame]:
    """Measure this rank's images batch by batch, writing each batch as a part file at once.

    ``done`` images of the study were stored before: the bar starts there (one process), or says
    so (several: the bar counts rank 0's share)."""
    for stale in out.glob(f".rank{rank}-part*.tmp"):
        stale.unlink()
    part = _next_part_number(out, rank)
    batches = [shard[start : start + batch_size] for start in range(0, len(shard), batch_size)]
    loader = DataLoader(
        dataset, batch_sampler=batches, collate_fn=_collate, num_workers=num_workers
    )
    frames = []
    if world > 1:
        description = f"{description} (rank 0 of {world})"
    initial = done if world == 1 else 0
    with tqdm(
        total=initial + len(shard), initial=initial, desc=description, unit="img",
        disable=not progress or rank != 0,
    ) as bar:
        if done and world > 1:
            bar.set_postfix_str(f"{done} stored before")
        for batch_indices, (images, labels) in zip(batches, loader):
            images = _model_input(model, images).to(device)
            labels = labels.to(device)
            extra = {"indices": torch.tensor(batch_indices, device=device)} if with_indices else {}
            frame = _batch_frame(measure(model, images, labels, **extra), batch_indices, labels)
            if columns is None:
                columns = list(frame.columns)
            elif set(frame.columns) != set(columns):
                raise ValueError(
                    f"measure must return the columns already stored in {str(out)!r} "
                    f"(with index and label: {columns}), got {list(frame.columns)}; "
                    "use a new out directory when the measurement changes"
                )
            _write_atomic(frame, out / f"rank{rank}-part{part:05d}.parquet")
            part += 1
            frames.append(frame)
            bar.update(len(batch_indices))
    return frames


def _batch_frame(values: MeasureOutput, indices: list[int], labels: Tensor) -> pd.DataFrame:
    """measure's output for one batch -> a frame with one row per image."""
    if not isinstance(values, Mapping):
        raise ValueError(
            f"measure must return a dict of per-image values, got {type(values).__name__}"
        )
    columns: dict[str, object] = {
        "index": np.asarray(indices, dtype=np.int64),
        "label": labels.cpu().numpy(),
    }
    for name, value in values.items():
        if not isinstance(name, str) or name in RESERVED_COLUMNS:
            raise ValueError(
                f"measure output names must be strings other than {RESERVED_COLUMNS}, got {name!r}"
            )
        columns[name] = _to_column(name, value, len(indices))
    return pd.DataFrame(columns)


def _to_column(name: str, value: Tensor | np.ndarray | Sequence, batch: int) -> np.ndarray | list:
    """[batch] values -> an array column; [batch, k] values -> a list column of [k] arrays."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()  # numpy has no bfloat16
        value = value.numpy()
    array = np.asarray(value)
    if array.ndim not in (1, 2) or len(array) != batch:
        raise ValueError(
            f"measure output {name!r} must have shape [batch] or [batch, k] with batch = {batch}, "
            f"got shape {array.shape}"
        )
    return array if array.ndim == 1 else list(array)


def _collate(items: list) -> tuple[Tensor | list, Int[Tensor, " batch"]]:
    """Data set items -> (stacked model input, or the list of raw images to preprocess; labels)."""
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"dataset items must be (image, label) pairs, got {type(item).__name__}"
            )
    images = [image for image, _ in items]
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.long)
    if all(isinstance(image, Tensor) and image.is_floating_point() for image in images):
        return torch.stack(images), labels
    return images, labels


def _model_input(
    model: nn.Module, images: Tensor | list
) -> Float[Tensor, "batch channel height width"]:
    if isinstance(images, Tensor):
        return images
    preprocess = getattr(model, "preprocess", None)
    if preprocess is None:
        raise ValueError(
            f"model must have a preprocess method to take raw images ({type(images[0]).__name__}); "
            "or give a dataset of preprocessed float tensors"
        )
    return preprocess(images)


def study_dataset(
    data: Tensor | LabelledImages | Dataset | str | os.PathLike, labels: Tensor | None = None
) -> Dataset | LabelledImages | str | os.PathLike:
    """A recipe's ``data`` / ``labels`` arguments as what :func:`run_study` reads.

    Images [image, channel, height, width] with their true classes ``labels`` [image] become a
    ``TensorDataset``; data that carries its own labels (``LabelledImages``, a ``Dataset``, an
    image-folder path) is returned as is, and ``labels`` must then be None.
    """
    if isinstance(data, Tensor):
        if labels is None:
            raise ValueError("labels must be given (true class per image) when data is a tensor of images")
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if data.ndim != 4 or labels.shape != (data.shape[0],):
            raise ValueError(
                f"data must be images [batch, channel, height, width] and labels [image], got shapes "
                f"{tuple(data.shape)} and {tuple(labels.shape)}"
            )
        return TensorDataset(data.cpu(), labels)
    if labels is not None:
        raise ValueError(
            f"labels must be None when data carries its own labels, got data of type {type(data).__name__}"
        )
    return data


def _as_dataset(dataset: Dataset | LabelledImages | str | os.PathLike) -> Dataset:
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_image_folder(dataset)
    if isinstance(dataset, LabelledImages):
        return TensorDataset(dataset.images, dataset.labels)
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise ValueError(
            "dataset must be a map-style torch Dataset, LabelledImages or an image folder path, "
            f"got {type(dataset).__name__}"
        )
    return dataset


def _check_indices(indices: Sequence[int] | Tensor | None, size: int) -> list[int]:
    """Requested data set indices, sorted and unique."""
    if indices is None:
        return list(range(size))
    indices = torch.as_tensor(indices).flatten()
    if indices.is_floating_point() and len(indices):
        raise ValueError(f"indices must be integers, got dtype {indices.dtype}")
    wanted = sorted(set(indices.tolist()))
    if wanted and (wanted[0] < 0 or wanted[-1] >= size):
        raise ValueError(
            f"indices must be in [0, {size - 1}] (the dataset has {size} images), "
            f"got {wanted[0] if wanted[0] < 0 else wanted[-1]}"
        )
    return wanted


def _as_json(name: str, value: Mapping) -> dict:
    """``value`` as it reads back from JSON (tuples become lists), so stored and new compare equal."""
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a JSON-serialisable mapping, got {value!r} ({error})") from None


def _claim_directory(out: Path, settings: dict) -> None:
    """Record the study's settings in ``out``, or refuse if it holds a study with other ones."""
    path = out / SETTINGS_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        changed = _differences(stored, settings)
        if changed:
            raise ValueError(
                f"out {str(out)!r} holds another study (differing: {'; '.join(changed)}); "
                "use a new out directory for a new study"
            )
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per torchrun process
    temporary.write_text(json.dumps(settings, indent=2))
    os.replace(temporary, path)


def _differences(stored: dict, settings: dict, prefix: str = "") -> list[str]:
    """What differs between two settings dicts, as short ``key: stored -> now`` texts."""
    changed = []
    for key in sorted(stored.keys() | settings.keys()):
        old, new = stored.get(key), settings.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed.extend(_differences(old, new, f"{prefix}{key}."))
        elif key == "model_sha256":
            changed.append(f"{prefix}{key} (another model or other weights)")
        elif key.endswith("sha256"):
            changed.append(f"{prefix}{key} (other data)")
        else:
            changed.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return changed


def _short(value, limit: int = 40) -> str:
    text = "missing" if value is None else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _read_parts(out: Path) -> pd.DataFrame | None:
    """All part files in ``out`` (any rank), one row per index, sorted; None if there are none."""
    paths = sorted(
        path for path in out.glob("rank*-part*.parquet") if _PART_NAME.fullmatch(path.name)
    )
    if not paths:
        return None
    stored = pd.concat([pd.read_parquet(path) for path in paths], ignore_index=True)
    # Rows of one index are equal; two copies arise only if two studies wrote into one directory.
    stored = stored.drop_duplicates(subset="index", keep="first")
    return stored.sort_values("index", kind="stable").reset_index(drop=True)


def _next_part_number(out: Path, rank: int) -> int:
    numbers = [
        int(match[2])
        for path in out.glob(f"rank{rank}-part*.parquet")
        if (match := _PART_NAME.fullmatch(path.name)) and int(match[1]) == rank
    ]
    return max(numbers, default=-1) + 1


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write a Parquet file so that it exists either whole or not at all."""
    temporary = path.with_name(f".{path.stem}.tmp")
    frame.to_parquet(temporary, index=False)
    os.replace(temporary, path)


def _empty_frame(stored: pd.DataFrame | None) -> pd.DataFrame:
    if stored is None:
        return pd.DataFrame({name: np.zeros(0, dtype=np.int64) for name in RESERVED_COLUMNS})
    return stored.iloc[:0]


@contextmanager
def _process_group() -> Iterator[tuple[object | None, int, int]]:
    """(group for the runner's messages, rank, world size); see run_study on distributed runs."""
    if not dist.is_available() or (
        not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1
    ):
        yield None, 0, 1
        return
    if not dist.is_initialized():
        # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. The group lives until exit:
        # initialising again after destroying it can meet stale peer addresses in torchrun's store.
        dist.init_process_group("gloo")
        atexit.register(_destroy_process_group)
    # all_gather_object of CPU objects needs gloo; an NCCL-only group gets a gloo twin.
    group = None if "gloo" in str(dist.get_backend()) else dist.new_group(backend="gloo")
    try:
        yield group, dist.get_rank(), dist.get_world_size()
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def _destroy_process_group() -> None:
    if dist.is_initialized():  # unless the user destroyed it already
        dist.destroy_process_group()


def _all_gather(value: object, group: object | None, world: int) -> list:
    """Every rank's ``value``, in rank order."""
    if world == 1:
        return [value]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, value, group=group)
    return gathered
