"""The data card of a published split: the facts of how it was made, as JSON beside the data and as
the ``README.md`` that is both the Hugging Face dataset card (``configs`` / ``data_files`` /
``dataset_info``, so ``datasets.load_dataset(<folder>)`` works) and the human-readable card.

A published split folder (``realsyn.export.published_split_path``) holds ``datacard.json`` (the
facts, plus ``evaluation`` once an evaluation ran), ``README.md`` (WebDataset tars) and
``parquet/README.md`` (the Parquet form). ``write_card(folder, facts=None, evaluation=None)``
(re)writes all three atomically from the facts (read back from ``datacard.json`` when not given):
an evaluation step calls it with its results; the data files are never touched, so the split's data
version stays what it was.

Facts (a plain dict, every key optional except ``split``): ``version``, ``data_version``,
``published_uri``, ``created_at``, ``samples``, ``tar_shards``, ``source_shards``, ``format``
(``image_extension``, ``real_text_members``, ``samples_per_shard``, ``members``), ``stage_counts``
(items left at each stage), ``drops`` ({stage: {reason: count}}), ``cluster_sizes`` (``before_cap``
and ``after_cap`` histograms), ``text_length`` and ``similarity`` (histograms), ``sources``,
``licenses``, ``config`` and ``code``. Histograms have fixed edges (``histogram``), so per-shard
histograms add up (``merge_histograms``).

No dagster here (core package): importable by any step or script.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from realsyn.io import atomic_write_bytes, filesystem_for, join_path

DATACARD_FILE = "datacard.json"
README_FILE = "README.md"
PARQUET_DIR = "parquet"

# Fixed bin edges (a value v falls in bin i when edges[i] <= v < edges[i + 1]; the last bin is open).
TEXT_LENGTH_EDGES = [0, 1, 20, 40, 60, 80, 100, 150, 200, 300, 500, 1000]  # characters
SIMILARITY_EDGES = [round(-1.0 + 0.05 * i, 2) for i in range(40)]  # cosine, -1 .. 1 in steps of 0.05
CLUSTER_SIZE_EDGES = [1, 2, 3, 5, 9, 17, 33, 65, 129, 257, 513, 1025, 4097, 16385, 65537]  # members of a cluster


def histogram(values: Any, edges: Sequence[float]) -> dict[str, list]:
    """{edges, counts}: counts[i] = values in [edges[i], edges[i + 1]); values below edges[0] go to bin 0, NaN nowhere."""
    v = np.asarray(values, np.float64).ravel()
    v = v[~np.isnan(v)]
    bins = np.clip(np.searchsorted(np.asarray(edges, np.float64), v, side="right") - 1, 0, len(edges) - 1)
    return {"edges": list(edges), "counts": np.bincount(bins, minlength=len(edges)).astype(int).tolist()}


def merge_histograms(a: dict | None, b: dict | None) -> dict | None:
    """The sum of two histograms with the same edges (None is empty)."""
    if not a or not b:
        return a or b
    if list(a["edges"]) != list(b["edges"]):
        raise ValueError("histograms with different edges cannot be added")
    return {"edges": list(a["edges"]), "counts": [int(x) + int(y) for x, y in zip(a["counts"], b["counts"])]}


def code_versions() -> dict[str, str]:
    """The versions the card records: realsyn, its git commit when the source tree has one, Python, pyarrow."""
    import pyarrow

    import realsyn

    out = {"realsyn": realsyn.__version__, "python": platform.python_version(), "pyarrow": pyarrow.__version__}
    commit = os.environ.get("REALSYN_GIT_COMMIT") or _git_commit(os.path.dirname(os.path.dirname(os.path.abspath(realsyn.__file__))))
    if commit:
        out["git_commit"] = commit
    return out


def _git_commit(repo: str) -> str | None:
    """HEAD's commit read from ``.git`` (no subprocess); None outside a checkout."""
    try:
        with open(os.path.join(repo, ".git", "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        path = os.path.join(repo, ".git", *ref.split("/"))
        if os.path.isfile(path):
            with open(path) as f:
                return f.read().strip() or None
        with open(os.path.join(repo, ".git", "packed-refs")) as f:
            for line in f:
                if line.rstrip().endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------------ Hugging Face card


def webdataset_features(image_extension: str, real_text_members: int) -> list[dict[str, Any]]:
    """``dataset_info.features`` (YAML list form) of the tars: given, so ``datasets`` need not infer them from
    the first samples (nulls there would type a field as null and fail on the first string)."""
    from realsyn.export import JSON_MEMBER_FEATURES

    meta = [dict(name=name, **feature) for name, feature in JSON_MEMBER_FEATURES.items()]
    out = [{"name": image_extension, "dtype": "image"}, {"name": "json", "struct": meta}]
    out += [{"name": f"real{j}.txt", "dtype": "string"} for j in range(real_text_members)]
    out += [{"name": "txt", "dtype": "string"}, {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
    return out


def _front_matter(data: dict[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def dataset_card(facts: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """README.md of the tar folder: the ``webdataset`` config (``*.tar``, typed features) and the card."""
    fmt = facts.get("format", {})
    header = {
        "pretty_name": f"RealSyn {facts['split']}" + (f" v{facts['version']}" if facts.get("version") else ""),
        "task_categories": ["zero-shot-image-classification", "image-to-text"],
        "size_categories": [_size_category(int(facts.get("samples", 0)))],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "*.tar"}], "default": True}],
        "dataset_info": {
            "config_name": "default",
            "features": webdataset_features(fmt.get("image_extension", "jpg"), int(fmt.get("real_text_members", 0))),
        },
    }
    return _front_matter(header) + "\n" + render_markdown(facts, evaluation)


def parquet_dataset_card(facts: dict[str, Any]) -> str:
    """README.md of the ``parquet/`` folder: the same samples as Parquet (the image column is a ``datasets`` Image)."""
    header = {
        "pretty_name": f"RealSyn {facts['split']} (Parquet)",
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "*.parquet"}], "default": True}],
    }
    body = f"# RealSyn split `{facts['split']}` as Parquet\n\nThe same samples as the WebDataset tars one folder up; the data card is `../README.md`.\n"
    return _front_matter(header) + "\n" + body


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M" if n < 100_000_000 else "100M<n<1B"


def _table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # a blank line first: a table cannot interrupt a paragraph
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _bin_label(edges: Sequence[float], i: int, integer: bool) -> str:
    lo = edges[i]
    if i + 1 == len(edges):
        return f">= {lo}"
    hi = edges[i + 1]
    if integer:
        return str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"
    return f"[{lo}, {hi})"


def _histogram_md(hist: dict | None, integer: bool) -> str:
    if not hist or not sum(hist["counts"]):
        return "(none)\n"
    total = sum(hist["counts"])
    rows = [
        (_bin_label(hist["edges"], i, integer), c, f"{100 * c / total:.1f}%", "#" * math.ceil(40 * c / max(hist["counts"])))
        for i, c in enumerate(hist["counts"])
        if c
    ]
    return _table(rows, ["bin", "count", "share", ""])


def render_markdown(facts: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """The human-readable card: every fact that is present, then the evaluation (or that none ran yet)."""
    out = [f"# RealSyn split `{facts['split']}`" + (f", version {facts['version']}" if facts.get("version") else "") + "\n"]
    ident = [
        (k, facts[k])
        for k in ("samples", "tar_shards", "source_shards", "data_version", "published_uri", "created_at")
        if facts.get(k) is not None
    ]
    if ident:
        out.append(_table(ident, ["fact", "value"]))
    fmt = facts.get("format")
    if fmt:
        ext, m = fmt.get("image_extension", "jpg"), int(fmt.get("real_text_members", 0))
        out.append(
            "\n## Format\n\nWebDataset tars (open_clip: `--train-data` from `train_data.txt`, sample counts in `sizes.json`) "
            f"with members `{ext}` (every image, one extension), `txt` (the synthetic caption, else the top real text), "
            + (f"`real0.txt` .. `real{m - 1}.txt` (the retrieved real texts by rank, empty where fewer were retrieved), " if m else "")
            + "`json` (all texts with scores, ids, size, source). The same samples as Parquet in `parquet/` (the `image` column is a "
            "`datasets` Image). `datasets.load_dataset(<this folder>)` reads the tars, `datasets.load_dataset(<this folder>/parquet)` the Parquet.\n"
        )
        out.append(
            _table([(k, ", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in sorted(fmt.items())], ["setting", "value"])
        )
    counts = facts.get("stage_counts")
    if counts:
        rows = [(k, v) for k, v in counts.items() if not isinstance(v, (dict, list))]
        out.append("\n## Counts at each stage\n\n" + _table(rows, ["stage", "items"]))
    drops = facts.get("drops")
    if drops:
        rows = [(stage, reason, n) for stage, reasons in drops.items() for reason, n in sorted(reasons.items(), key=lambda x: -x[1])]
        out.append("\n## Drop reasons\n\n" + (_table(rows, ["stage", "reason", "dropped"]) if rows else "(nothing dropped)\n"))
    clusters = facts.get("cluster_sizes")
    if clusters:
        for key, title in (("before_cap", "before capping (every candidate)"), ("after_cap", "after capping (this split)")):
            out.append(f"\n## Image cluster sizes {title}\n\n" + _histogram_md(clusters.get(key), integer=True))
    for group, title in (("text_length", "Text length (characters)"), ("similarity", "Similarity (cosine)")):
        for key, hist in (facts.get(group) or {}).items():
            out.append(f"\n## {title}: {key.replace('_', ' ')}\n\n" + _histogram_md(hist, integer=group == "text_length"))
    sources = facts.get("sources")
    if sources:
        out.append("\n## Sources\n\n")
        if sources.get("input"):
            out.append(f"Input: `{sources['input']}`\n\n")
        if sources.get("input_shards") is not None:
            out.append(f"Input shards: {len(sources['input_shards'])}\n\n")
        domains = sources.get("domains") or {}
        if domains:
            out.append(_table(list(domains.items()), ["image host", "samples"]))
        if sources.get("note"):
            out.append(f"\n{sources['note']}\n")
    if "licenses" in facts:
        lic = facts["licenses"]
        out.append(
            "\n## Licences\n\n"
            + (_table(sorted(lic.items()), ["licence", "documents"]) if lic else "The input carries no licence field.\n")
        )
    if facts.get("config"):
        out.append("\n## Configuration\n\n```json\n" + json.dumps(facts["config"], indent=1, sort_keys=True, default=str) + "\n```\n")
    if facts.get("code"):
        out.append("\n## Code versions\n\n" + _table(sorted(facts["code"].items()), ["component", "version"]))
    out.append("\n## Evaluation\n\n")
    if evaluation:
        flat = _flatten(evaluation)
        out.append(_table(sorted(flat.items()), ["metric", "value"]))
    else:
        out.append("Not evaluated yet.\n")
    return "".join(out)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------------ files


def _resolve(folder: str, storage_options: dict[str, Any] | None, filesystem: Any) -> tuple[Any, str]:
    if filesystem is not None:
        return filesystem, folder.rstrip("/")
    return filesystem_for(folder.rstrip("/"), storage_options)


def read_card(folder: str, storage_options: dict[str, Any] | None = None, filesystem: Any = None) -> dict[str, Any]:
    """``datacard.json`` of a published folder: {"facts": ..., "evaluation": ... or None}."""
    fs, path = _resolve(folder, storage_options, filesystem)
    return json.loads(fs.cat_file(join_path(fs, path, DATACARD_FILE)))


def write_card(
    folder: str,
    facts: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> str:
    """(Re)write the card of a published split folder: ``datacard.json``, ``README.md`` and ``parquet/README.md``.

    ``folder`` is a URI (``realsyn.export.published_split_path``), or a path of ``filesystem`` when
    that is given. ``facts`` None: the facts already in ``datacard.json``; ``evaluation`` None keeps
    the evaluation already recorded (pass ``{}`` to clear it). Each file is replaced atomically; the
    data files are not touched, so the data version stays. Returns the markdown of the card (for a UI).
    """
    fs, path = _resolve(folder, storage_options, filesystem)
    card_path = join_path(fs, path, DATACARD_FILE)
    old: dict[str, Any] = {}
    if facts is None or evaluation is None:
        try:
            old = json.loads(fs.cat_file(card_path))
        except FileNotFoundError:
            if facts is None:
                raise FileNotFoundError(f"{folder}: no {DATACARD_FILE} to read the facts from; pass facts") from None
    facts = facts if facts is not None else old["facts"]
    evaluation = evaluation if evaluation is not None else old.get("evaluation")
    card = {"facts": facts, "evaluation": evaluation or None}
    atomic_write_bytes(fs, card_path, json.dumps(card, indent=1, sort_keys=True, default=str).encode())
    atomic_write_bytes(fs, join_path(fs, path, README_FILE), dataset_card(facts, evaluation).encode())
    if fs.exists(join_path(fs, path, PARQUET_DIR)):
        atomic_write_bytes(fs, join_path(fs, path, PARQUET_DIR, README_FILE), parquet_dataset_card(facts).encode())
    return render_markdown(facts, evaluation)
