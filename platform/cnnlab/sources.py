"""Reading a `data.source` into labelled samples: ImageFolder roots, CSV manifests, WebDataset shards (a
local folder, or a URL or brace pattern read through fsspec), the built-in `digits` and `synthetic`; decoding
one image to RGB uint8 with clear errors."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import tarfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnlab import UserError
from cnnlab.cnnlab_model import read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
SHARD_IMAGES = ("jpg", "jpeg", "png", "webp")
# open_image enforces data.max_pixels itself; PIL's own warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")  # a brace pattern: {00000..00004} or {train,test}
SOURCE_HELP = (
    "Give an ImageFolder root, a CSV manifest (path,label), a folder, URL or brace pattern of WebDataset shards, "
    "'digits' or 'synthetic'."
)


class BadImageError(UserError):
    """An image that cannot be used: unreadable, truncated, not an image, or over the pixel limit."""


class ShardError(UserError):
    """A shard that cannot be read: unreadable, or still failing after data.retries attempts."""


@dataclass(frozen=True)
class Fetch:
    """How remote shards are read: attempts after the first, with a backoff of 1, 2, 4 ... s (at most 30 s)
    between them, and the seconds a connection or a read may stall."""

    retries: int = 3
    timeout: float = 60.0


def is_remote(source: str) -> bool:
    return "://" in source


@dataclass
class Samples:
    """Items (file paths, encoded bytes, (shard, member) references, or ints for `synthetic`) with their class
    indices."""

    items: list
    labels: list[int]
    names: list[str] = field(default_factory=list)  # how errors name an item, where it is not a path

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        return self.names[i] if self.names else str(self.items[i])

    def fingerprint(self, root: str = "") -> str:
        """A hash of the file list (names relative to the source, with labels): same data, same hash."""
        digest = hashlib.sha256()
        for i, label in enumerate(self.labels):
            name = self.name(i)
            digest.update(f"{os.path.relpath(name, root) if root and not name.isdigit() else name}\t{label}\n".encode())
        return digest.hexdigest()[:16]

    def raw(self, i: int, image_size: int = 32) -> bytes:
        """Item i as encoded image bytes, the way a client would send it."""
        item = self.items[i]
        if isinstance(item, tuple):
            return load_members(self.subset([i])).items[0]
        if isinstance(item, bytes):
            return item
        if isinstance(item, int):
            buffer = io.BytesIO()
            Image.fromarray(synthetic_image(item, image_size)).save(buffer, "PNG")
            return buffer.getvalue()
        return Path(item).read_bytes()

    def subset(self, index) -> Samples:
        return Samples(
            [self.items[i] for i in index],
            [self.labels[i] for i in index],
            [self.names[i] for i in index] if self.names else [],
        )


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the project root (so recipes work from any directory)."""
    given = Path(path)
    return (
        given if given.exists() or given.is_absolute() or not (PROJECT_ROOT / given).exists() else PROJECT_ROOT / given
    )


def cache_dir() -> Path:
    return Path(os.environ.get("CNNLAB_CACHE", Path.home() / ".cache" / "cnnlab"))


def read_source(
    source: str,
    synthetic_size: int = 2048,
    stream: bool = False,
    fetch: Fetch = Fetch(),
    left_out: list | None = None,
) -> tuple[list[str], dict[str, Samples]]:
    """Classes and the splits the source itself defines ('all' where it defines none).

    With `stream`, the training images of WebDataset shards are not read into memory: their items are
    (shard, member) references that `ShardStream` reads as it goes, and `load_members` on demand. With
    `left_out` a list, a shard that cannot be read is left out (appended to it, with a warning) instead of
    stopping the fit."""
    if source == "digits":
        source = str(digits_folder())
    if source == "synthetic":
        return [f"class_{i}" for i in range(10)], {
            "all": Samples(list(range(synthetic_size)), [i % 10 for i in range(synthetic_size)])
        }
    path = resolve_path(source)
    if shards := shard_list(source, fetch):
        found = _read_shards(shards, source, stream, fetch, left_out)
    elif not path.exists():
        raise UserError(f"data.source='{source}' does not exist. {SOURCE_HELP}")
    elif path.suffix == ".csv":
        found = _read_csv(path)
    elif path.is_dir():
        found = _read_folder(path)
    else:
        raise UserError(f"data.source='{source}' is a file but not a .csv manifest. {SOURCE_HELP}")
    check_classes(found[0], source)
    return found


def check_classes(classes: list[str], source: str) -> None:
    """Two classes or more, each named so that its per-class metrics (`test/acc_class/NAME`) are valid."""
    if len(classes) < 2:
        raise UserError(
            f"data.source='{source}' has {len(classes)} class ({', '.join(classes) or 'none'}): a "
            "classifier needs two or more. Add a folder (or labels) for each class."
        )
    for name in classes:
        if not re.fullmatch(r"[\w\-. :]+", name) or name.strip(" .") != name.strip() or not name.strip(" ."):
            raise UserError(
                f"data.source='{source}': class name {name!r} cannot name a metric. Use letters, digits, "
                "spaces and _ - . : only, and not only dots or spaces."
            )


def scan_folder(root: Path) -> dict:
    """An ImageFolder root: classes, splits, and what does not fit (class folders with no images, other files)."""
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise UserError(f"data.source='{root}' has {'/'.join(split_dirs)}/ but no train/ folder. Add train/.")
    from torchvision.datasets.folder import find_classes, make_dataset

    try:
        classes, index = find_classes(str(split_dirs.get("train", root)))
    except FileNotFoundError:
        raise UserError(
            f"data.source='{root}' has no class folders. An ImageFolder root holds one folder per "
            "class (optionally under train/, val/, test/)."
        ) from None
    scan = {"classes": classes, "splits": {}, "empty": [], "ignored": []}
    for split, folder in (split_dirs or {"all": root}).items():
        unknown = sorted(d for d in folder.iterdir() if d.is_dir() and d.name not in index)
        if unknown:
            raise UserError(
                f"data.source='{root}': class folder {unknown[0]} is not in train/. Classes: {', '.join(classes)}."
            )
        images = make_dataset(str(folder), index, extensions=IMAGE_EXTENSIONS, allow_empty=True)
        found = {label for _, label in images}
        if split in ("train", "all"):
            scan["empty"] += [folder / name for name in classes if index[name] not in found]
        scan["ignored"] += [
            p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS
        ]
        scan["splits"][split] = Samples([path for path, _ in images], [label for _, label in images])
    return scan


def _read_folder(root: Path) -> tuple[list[str], dict[str, Samples]]:
    scan = scan_folder(root)
    if scan["empty"]:
        raise UserError(
            f"data.source='{root}' has a class folder with no images: "
            f"{', '.join(map(str, scan['empty']))}. Remove the folder or add images to it."
        )
    return scan["classes"], scan["splits"]


def _read_csv(manifest: Path) -> tuple[list[str], dict[str, Samples]]:
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise UserError(
            f"data.source='{manifest}' needs a header with the columns path,label "
            "(and optionally split: train/val/test)."
        )
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or row.get("label") is None or not row["label"].strip():
            raise UserError(
                f"data.source='{manifest}' line {line}: every row needs a path and a label "
                f"(got path={row.get('path')!r}, label={row.get('label')!r})."
            )
    names = sorted({r["label"] for r in rows}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    splits: dict[str, Samples] = {}
    for line, row in enumerate(rows, start=2):
        split = row.get("split") or "all"
        if split not in (*SPLITS, "all"):
            raise UserError(f"data.source='{manifest}' line {line}: split='{split}' must be train, val or test.")
        target = splits.setdefault(split, Samples([], []))
        target.items.append(str(manifest.parent / row["path"]))
        target.labels.append(names.index(row["label"]))
    return names, splits


def shard_list(source: str, fetch: Fetch = Fetch()) -> list[str]:
    """The shards a source names, in order: a local folder of shards, a brace pattern (local or remote,
    `train-{00000..00004}.tar.gz`), a shard's URL, or a folder URL that fsspec can list (s3://, gs://, an
    HTTP index page). Empty for any other source."""
    if BRACES.search(source):
        from braceexpand import braceexpand

        shards = list(braceexpand(source))
        missing = [s for s in shards if not is_remote(s) and not resolve_path(s).is_file()]
        if missing:
            raise UserError(
                f"data.source='{source}': {missing[0]} does not exist ({len(missing)} missing). {SOURCE_HELP}"
            )
        # local shards by their folder's real path, as a folder source names them (the fingerprint's root)
        return [s if is_remote(s) else str(resolve_path(s).parent.resolve() / Path(s).name) for s in shards]
    if is_remote(source):
        if source.endswith(SHARD_SUFFIXES):
            return [source]
        fs, root = _filesystem(source, fetch)
        try:
            names = fs.ls(root, detail=False)
        except Exception as err:
            raise UserError(f"data.source='{source}' cannot be listed ({_reason(err)}). {SOURCE_HELP}") from None
        shards = sorted(n if is_remote(n) else fs.unstrip_protocol(n) for n in names if n.endswith(SHARD_SUFFIXES))
        if not shards:
            raise UserError(f"data.source='{source}' lists no .tar or .tar.gz shards. {SOURCE_HELP}")
        return shards
    path = resolve_path(source).resolve()
    if path.is_dir() and (shards := sorted(str(p) for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES))):
        return shards
    return []


def source_root(source: str) -> str:
    """What a source's sample names are relative to in its fingerprint: the shards' folder (of a URL or a brace
    pattern too, so remote shards hash as local ones), the CSV's folder, the ImageFolder root; nothing for
    `synthetic`."""
    if source == "synthetic":
        return ""
    if is_remote(source):
        return os.path.dirname(source)
    if BRACES.search(source):
        return str(resolve_path(os.path.dirname(source)).resolve())
    path = (digits_folder() if source == "digits" else resolve_path(source)).resolve()
    return str(path.parent if path.suffix == ".csv" else path)


def _filesystem(url: str, fetch: Fetch):
    """fsspec's filesystem for a URL. HTTP streams (no range requests) with `fetch.timeout`; other
    protocols take credentials from their usual environment variables (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)."""
    import fsspec

    options = {}
    if url.startswith(("http://", "https://")):
        import aiohttp

        timeout = aiohttp.ClientTimeout(sock_connect=fetch.timeout, sock_read=fetch.timeout)
        options = {"block_size": 0, "client_kwargs": {"timeout": timeout}}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        raise UserError(f'data.source=\'{url}\': {err} (pip install "cnnlab[s3]" or "cnnlab[gcs]").') from None


@contextmanager
def open_shard(shard: str, fetch: Fetch):
    """A shard as a tarfile: a local one seekable, a remote one as a stream."""
    if not is_remote(shard):
        with tarfile.open(shard, "r:*") as tar:
            yield tar
        return
    fs, path = _filesystem(shard, fetch)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        yield tar


def _reason(err: BaseException) -> str:
    """What went wrong with a remote file, from the innermost cause (fsspec reports an HTTP 503 or a timeout as
    'file not found', and a 404 as a bare FileNotFoundError)."""
    cause = err.__cause__ or err.__context__ or err
    if getattr(cause, "status", None):
        return f"HTTP {cause.status} {getattr(cause, 'message', '')}".strip()
    if isinstance(cause, FileNotFoundError):
        return "HTTP 404 not found"
    return str(cause) or type(cause).__name__


def read_members(shard: str, names, fetch: Fetch = Fetch()) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the given members of one shard, in shard order (all of them when names is None). An
    uncompressed local tar is skipped over by seeking; a gzipped or remote one is read up to the last member
    wanted. A remote shard that fails is read again after a backoff, from where it broke off."""
    wanted, done = None if names is None else set(names), set()
    attempts = fetch.retries + 1 if is_remote(shard) else 1
    for attempt in range(attempts):
        try:
            with open_shard(shard, fetch) as tar:
                for member in tar:
                    if member.isfile() and member.name not in done and (wanted is None or member.name in wanted):
                        data = tar.extractfile(member).read()
                        done.add(member.name)
                        yield member.name, data
                        if wanted is not None and len(done) == len(wanted):
                            return
            break
        except (OSError, EOFError, tarfile.TarError, *_network_errors()) as err:
            if attempt + 1 == attempts:
                again = f" after {attempts} attempts" if attempts > 1 else ""
                fix = (
                    "Check the address and the network, raise data.retries / data.timeout"
                    if is_remote(shard)
                    else "Check it with `sha256sum -c SHA256SUMS` or remove it"
                )
                raise ShardError(
                    f"shard {shard} is unreadable{again} ({_reason(err) if is_remote(shard) else err}). {fix}, "
                    "or set data.on_bad_image: skip to leave it out."
                ) from None
            time.sleep(min(2**attempt, 30))
    if wanted is not None and (gone := wanted - done):
        raise UserError(
            f"shard {shard} changed since it was indexed: {len(gone)} members are gone "
            f"(e.g. {next(iter(gone))}). Restart the run."
        )


def _network_errors() -> tuple[type[BaseException], ...]:
    try:
        import aiohttp

        return (aiohttp.ClientError,)
    except ImportError:
        return ()


def _read_shards(
    shards: list[str], source: str, stream: bool, fetch: Fetch, left_out: list | None
) -> tuple[list[str], dict[str, Samples]]:
    """WebDataset shards (`{split}-*.tar[.gz]`, members KEY.jpg + KEY.cls), read once into memory as bytes;
    with `stream`, the images of train (or unsplit) shards are kept as (shard, member) references. Class
    names from classes.txt beside the first shard, else the class indices. A shard that cannot be read
    stops with its name, or, where `left_out` is a list, is appended to it with a warning."""
    splits: dict[str, Samples] = {}
    for shard in shards:
        name = shard.rsplit("/", 1)[-1]
        split = name.split("-")[0] if name.split("-")[0] in SPLITS else "all"
        by_reference, pending, found = stream and split in ("train", "all"), {}, []
        try:
            for member, data in read_members(shard, None, fetch):
                key, _, ext = member.partition(".")
                sample = pending.setdefault(key, {})
                sample[ext] = (shard, member) if ext in SHARD_IMAGES and by_reference else data
                if "cls" in sample and (image := next((e for e in sample if e in SHARD_IMAGES), None)):
                    found.append((sample.pop(image), int(sample["cls"]), f"{shard}:{key}.{image}"))
                    del pending[key]
        except ShardError as err:
            if left_out is None:
                raise ShardError(f"data.source='{source}': {err}") from None
            warnings.warn(f"data.source='{source}': left out {err}", stacklevel=2)
            left_out.append(shard)
            continue
        target = splits.setdefault(split, Samples([], [], []))
        for item, label, where in found:
            target.items.append(item)
            target.labels.append(label)
            target.names.append(where)
    classes = _class_names(shards[0].rsplit("/", 1)[0] + "/classes.txt", fetch)
    if classes is None:
        classes = [str(i) for i in range(max(max(s.labels, default=0) for s in splits.values()) + 1)]
    return classes, splits


def _class_names(where: str, fetch: Fetch) -> list[str] | None:
    try:
        if not is_remote(where):
            return Path(where).read_text().split()
        fs, path = _filesystem(where, fetch)
        with fs.open(path, "rb") as f:
            return f.read().decode().split()
    except (OSError, *_network_errors()):
        return None


def load_members(samples: Samples, fetch: Fetch = Fetch()) -> Samples:
    """The same samples with every (shard, member) reference replaced by the member's bytes."""
    wanted: dict[str, dict[str, int]] = {}
    for i, item in enumerate(samples.items):
        if isinstance(item, tuple):
            wanted.setdefault(item[0], {})[item[1]] = i
    if not wanted:
        return samples
    items = list(samples.items)
    for shard, members in wanted.items():
        for name, data in read_members(shard, members, fetch):
            items[members[name]] = data
    return Samples(items, samples.labels, samples.names)


def digits_folder() -> Path:
    """scikit-learn's bundled digits (1,797 8x8 images), written once as a PNG ImageFolder."""
    folder = cache_dir() / "digits"
    if folder.exists():
        return folder
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = folder.with_name(f"digits.tmp{os.getpid()}")
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        (tmp / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(tmp / str(label) / f"{i:04d}.png")
    try:
        tmp.rename(folder)  # atomic: several ranks may race to write it
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def stratified_split(samples: Samples, fractions: dict[str, float], seed: int) -> dict[str, Samples]:
    """Split per class with a fixed seed, so every split keeps the class balance and never moves."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(samples.labels)
    index = {name: [] for name in ("train", *fractions)}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for name, fraction in fractions.items():
            n = int(round(len(members) * fraction))
            index[name] += members[start : start + n].tolist()
            start += n
        index["train"] += members[start:].tolist()
    return {name: samples.subset(sorted(ix)) for name, ix in index.items()}


def fold_splits(splits: dict[str, Samples], fold: int, folds: int, seed: int) -> dict[str, Samples]:
    """Cross-validation fold `fold` (from 1) of `folds`: the train and val splits pooled and dealt per class into
    `folds` folds with a fixed seed; this fold is the val split, the others the train split. Test stays."""
    pool = [splits[s] for s in ("train", "val") if s in splits]
    pooled = Samples(
        [item for s in pool for item in s.items],
        [label for s in pool for label in s.labels],
        [s.name(i) for s in pool for i in range(len(s))] if any(s.names for s in pool) else [],
    )
    rng, labels, held = np.random.default_rng(seed), np.asarray(pooled.labels), []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held += members[(fold - 1 + int(label)) % folds :: folds].tolist()  # each class starts at another fold
    rest = sorted(set(range(len(pooled))) - set(held))
    return {**splits, "train": pooled.subset(rest), "val": pooled.subset(sorted(held))}


def open_image(item, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode a path or encoded bytes to an RGB uint8 array; also returns the original mode."""
    try:
        return read_image(item if isinstance(item, bytes) else Path(item).read_bytes(), max_pixels)
    except OverflowError as err:
        raise BadImageError(
            f"{str(err).split(' is over')[0]} is over data.max_pixels={max_pixels} (a decompression bomb?)"
        ) from None
    except UnidentifiedImageError:
        raise BadImageError("not an image") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(f"over the pixel limit ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"unreadable or truncated ({err})") from None


def synthetic_image(index: int, size: int) -> np.ndarray:
    return np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)


SPLIT_KEYS = ("source", "val_fraction", "test_fraction", "split_seed", "synthetic_size", "fold")


def recorded_data(data) -> dict:
    """The keys that define a source's splits (from a DataModule or its hyperparameters), recorded with a
    model so that its held-out split can be found again; a local source as an absolute path."""
    hparams = dict(getattr(data, "hparams", data))
    recorded = {k: hparams[k] for k in SPLIT_KEYS if k in hparams}
    source = recorded.get("source")
    if source and source not in ("digits", "synthetic") and resolve_path(source).exists():
        recorded["source"] = str(resolve_path(source).resolve())
    return recorded
