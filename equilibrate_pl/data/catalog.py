"""The public datasets the project reads: where each comes from and where a local copy is looked for.

A *data folder* holds one sub-folder per dataset, named as below, with the original files::

    <data folder>/xstest/xstest_prompts.csv                         (+ the 2,250 labelled completions)
    <data folder>/beavertails-fdc/beavertails_selected_relabelled.json
    <data folder>/hh-rlhf/harmless-base-test.jsonl.gz
    <data folder>/pku-saferlhf/{train,test}.jsonl                   (optional, larger)
    <data folder>/beavertails/{30k_train,30k_test}.jsonl            (optional, larger)

:func:`locate` looks for a file in, in order: ``$EQUILIBRATE_DATA``, the download folder
(``$EQUILIBRATE_CACHE/data``, default ``~/.cache/equilibrate/data``) and ``../shared/data`` beside
the repository (the copy on the project's own machines and CI). :func:`require` also downloads the
dataset into the download folder on first use when the network is allowed (``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE`` unset), and otherwise raises a one-line error saying how to get it.
``equilibrate data download NAME [--to DIR]`` (:func:`download`) fetches one for offline use.

Downloads go through ``datasets``: the authors' own files byte for byte where a dataset is a set of
files (XSTest and the FDC labels from the authors' GitHub repositories, hh-rlhf from the hub), the
hub splits written as JSONL where it is a hub dataset (PKU-SafeRLHF, BeaverTails). Nothing here is
redistributed with the repository; each dataset keeps its own license.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PublicDataset", "DATASETS", "DatasetNotFound", "data_dirs", "download", "download_dir", "locate", "require"]

DATA_ENV = "EQUILIBRATE_DATA"


@dataclass(frozen=True)
class PublicDataset:
    """One public dataset: its folder name, files, loader preset and origin.

    Args:
        name: the sub-folder of a data folder (and the ``equilibrate data`` name).
        title: what it is, in a few words.
        files: file names inside the sub-folder; the first is the default one.
        preset: the :data:`~equilibrate_pl.data.loaders.PRESETS` key that reads the default file.
        license: the dataset's own license.
        urls: file name -> URL (``https://`` or ``hf://datasets/...``) for datasets that are files.
        hub: ``(hub id, config or None)`` for datasets read with ``datasets.load_dataset``; each
            file ``<split>.jsonl`` is that split.
        origin: where ``download`` fetches it from, for people.
    """

    name: str
    title: str
    files: tuple[str, ...]
    preset: str | None
    license: str
    urls: dict[str, str] = field(default_factory=dict)
    hub: tuple[str, str | None] | None = None
    origin: str = ""


_XSTEST = "https://raw.githubusercontent.com/paul-rottger/exaggerated-safety/main"
_XSTEST_MODELS = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
_FDC = "https://raw.githubusercontent.com/Yingshui-Tan/Equilibrate-RLHF/main"

DATASETS: dict[str, PublicDataset] = {
    d.name: d
    for d in (
        PublicDataset(
            "xstest", "XSTest: 250 safe prompts that look unsafe + 200 unsafe contrasts, and 2,250 labelled completions",
            ("xstest_prompts.csv", *(f"xstest_v2_completions_{m}.csv" for m in _XSTEST_MODELS), "LICENSE"),
            "xstest", "CC-BY-4.0 (prompts); completions under their models' licenses",
            urls={"xstest_prompts.csv": f"{_XSTEST}/xstest_prompts.csv", "LICENSE": f"{_XSTEST}/LICENSE",
                  **{f"xstest_v2_completions_{m}.csv": f"{_XSTEST}/model_completions/xstest_v2_completions_{m}.csv"
                     for m in _XSTEST_MODELS}},
            origin="the authors' files, github.com/paul-rottger/exaggerated-safety (hub mirror: walledai/XSTest)",
        ),
        PublicDataset(
            "beavertails-fdc", "BeaverTails-30k-test prompts labelled EHD/IHD/MHD by the Equilibrate authors (3,024 rows)",
            ("beavertails_selected_relabelled.json", "LICENSE"), "beavertails-fdc", "Apache-2.0",
            urls={"beavertails_selected_relabelled.json": f"{_FDC}/dataset/beavertails_selected_relabelled.json",
                  "LICENSE": f"{_FDC}/LICENSE"},
            origin="the authors' release, github.com/Yingshui-Tan/Equilibrate-RLHF (dataset/)",
        ),
        PublicDataset(
            "hh-rlhf", "Anthropic hh-rlhf, harmless-base test split (2,312 preference pairs)",
            ("harmless-base-test.jsonl.gz",), "hh-rlhf", "MIT",
            urls={"harmless-base-test.jsonl.gz": "hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz"},
            origin="hub: Anthropic/hh-rlhf (harmless-base/test.jsonl.gz)",
        ),
        PublicDataset(
            "pku-saferlhf", "PKU-SafeRLHF: safety preference pairs with per-response safety labels",
            ("train.jsonl", "test.jsonl"), "pku-saferlhf", "CC-BY-NC-4.0", hub=("PKU-Alignment/PKU-SafeRLHF", None),
            origin="hub: PKU-Alignment/PKU-SafeRLHF (splits train, test, as JSONL)",
        ),
        PublicDataset(
            "beavertails", "BeaverTails: question-answer pairs with safety labels over 14 harm categories",
            ("30k_train.jsonl", "30k_test.jsonl"), "beavertails", "CC-BY-NC-4.0", hub=("PKU-Alignment/BeaverTails", None),
            origin="hub: PKU-Alignment/BeaverTails (splits 30k_train, 30k_test, as JSONL)",
        ),
    )
}


class DatasetNotFound(FileNotFoundError):
    """A public dataset is not available locally (and could not be downloaded). One line."""


def _spec(name: str) -> PublicDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
    return DATASETS[name]


def download_dir() -> Path:
    """Where ``equilibrate data download`` puts datasets by default: ``$EQUILIBRATE_CACHE/data``
    (default ``~/.cache/equilibrate/data``)."""
    cache = os.environ.get("EQUILIBRATE_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "equilibrate") / "data"


def _repo_sibling() -> Path:
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def data_dirs() -> list[tuple[str, Path]]:
    """The data folders looked in, in order, each with where it comes from."""
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser()))
    dirs.append(("download folder", download_dir()))
    dirs.append(("beside the repository", _repo_sibling()))
    return dirs


def locate(name: str, file: str | None = None, dirs: list[tuple[str, Path]] | None = None) -> Path | None:
    """The first existing ``<data folder>/<name>/<file>`` (default file: the dataset's first) among
    ``dirs`` (default :func:`data_dirs`), or None."""
    spec = _spec(name)
    file = file or spec.files[0]
    for _, root in dirs if dirs is not None else data_dirs():
        path = root / name / file
        if path.is_file():
            return path
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"} for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def how_to_get(name: str) -> str:
    return (f"`equilibrate data download {name}` (needs network) or set ${DATA_ENV} to a folder holding {name}/ "
            f"(looked in: {', '.join(str(p) for _, p in data_dirs())})")


def require(name: str, file: str | None = None, *, allow_download: bool | None = None) -> Path:
    """:func:`locate`, else download into :func:`download_dir` when allowed (default: unless the
    hub is set offline), else :class:`DatasetNotFound` naming how to get the dataset."""
    found = locate(name, file)
    if found is not None:
        return found
    spec = _spec(name)
    file = file or spec.files[0]
    if allow_download is None:
        allow_download = not _offline()
    if allow_download:
        try:
            download(name)
        except Exception as err:  # network, hub or permission errors all end the same way for the caller
            raise DatasetNotFound(f"{name}/{file}: not found locally and the download failed ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); {how_to_get(name)}") from None
        found = locate(name, file)
        if found is not None:
            return found
    raise DatasetNotFound(f"{name}/{file} not found; get it with {how_to_get(name)}")


def download(name: str, to: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Fetch dataset ``name`` into ``<to>/<name>/`` (default :func:`download_dir`); returns that folder.

    Files already there are kept unless ``force``. Each file is written next to its final place and
    renamed, so an interrupted download never leaves a partial file under the final name.
    """
    spec = _spec(name)
    folder = Path(to if to is not None else download_dir()).expanduser() / name
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [f for f in spec.files if force or not (folder / f).is_file()]
    if not wanted:
        return folder
    if spec.hub is not None:
        import datasets

        repo, config = spec.hub
        for file in wanted:
            split = file.removesuffix(".jsonl")
            ds = datasets.load_dataset(repo, config, split=split)
            _write_atomic(folder / file, lambda tmp, ds=ds: ds.to_json(str(tmp), lines=True, force_ascii=False))
    else:
        from datasets import DownloadManager

        cached = DownloadManager(dataset_name=name).download({f: spec.urls[f] for f in wanted})
        for file, path in cached.items():
            _write_atomic(folder / file, lambda tmp, path=path: shutil.copyfile(path, tmp))
    return folder


def _write_atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
