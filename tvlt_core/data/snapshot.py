"""A run's pinned data: the manifest as it was when the run started, kept in the run folder.

    snap, how = pin(run_folder, manifest_url, refresh=False)   # how: "new" | "kept" | "refreshed"
    check_needs(snap, task="tvlt-pretrain", mode="pretrain")   # wrong data fails before any worker starts
    save(run_folder, snap)                                     # (when how is not "kept")

Preprocessing on a schedule keeps adding generations to a shard folder and rewrites older shards (a changed source
retires them). A worker group restarted by Ray Train, or a relaunch of the run, must read exactly the shards the
run started on, or a restored loader position lands in another shard list. So the first launch copies what the
loader needs of ``manifest.json`` (shard names, sample counts, bytes, sha256, generation, mode, recipe) into
``<run folder>/data-snapshot.json``; every later launch and every worker reads that file, never the live
manifest. ``digest`` names the pinned shard list and is the run's MLflow dataset digest. Continuing on newer data
is explicit (``data.refresh``): a new snapshot replaces the old one and the loader restarts its epoch (the saved
position is a place in the old shard list and means nothing in the new one).

A rewritten shard keeps its name but not its bytes: the pinned bytes and sha256 then fail verification on read
(``tvlt_core.data.stream``), by ``data.on_damage``, instead of yielding other samples than the run started on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import fsspec

from tvlt_core import shards

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "data-snapshot.json"
SNAPSHOT_FORMAT = "tvlt-data-snapshot/1"
Pinned = Literal["new", "kept", "refreshed"]


@dataclass
class DataSnapshot:
    """The shards a run trains on: enough of the manifest to plan, read and verify them."""

    folder: str  # the shard folder URL the shard names are relative to
    mode: str
    recipe_hash: str
    generation: int
    shards: list[shards.ShardEntry] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)
    taken: str = ""  # UTC time the snapshot was taken
    format: str = SNAPSHOT_FORMAT

    @classmethod
    def of_manifest(cls, manifest_url: str, manifest: shards.Manifest) -> DataSnapshot:
        folder = manifest_url.rsplit("/", 1)[0] if manifest_url.endswith(".json") else manifest_url.rstrip("/")
        return cls(folder=folder, mode=manifest.mode, recipe_hash=manifest.recipe_hash, generation=manifest.generation,
                   shards=[dataclasses.replace(s) for s in manifest.shards], recipe=dict(manifest.recipe),
                   taken=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip

    @property
    def digest(self) -> str:
        """16 hex digits naming exactly these shards (names, counts, bytes, sha256) of this mode and recipe."""
        listed = [[s.name, s.samples, s.bytes, s.sha256, s.generation] for s in self.shards]
        identity = {"mode": self.mode, "recipe_hash": self.recipe_hash, "shards": listed}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def urls(self) -> list[str]:
        return [f"{self.folder}/{s.name}" for s in self.shards]

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "digest": self.digest}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DataSnapshot:
        data = json.loads(text)
        if data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"data snapshot format {data.get('format')!r} is not {SNAPSHOT_FORMAT!r}")
        stored = data.pop("digest", "")
        data["shards"] = [shards.ShardEntry(**s) for s in data["shards"]]
        snap = cls(**data)
        if stored and stored != snap.digest:  # edited by hand, or damaged: it no longer names what the run read
            raise ValueError(f"data snapshot digest {stored} does not match its shard list ({snap.digest})")
        return snap


def take(manifest_url: str) -> DataSnapshot:
    """A snapshot of the live manifest at ``manifest_url`` (folder or manifest.json URL)."""
    return DataSnapshot.of_manifest(manifest_url, shards.load_manifest(manifest_url))


def snapshot_url(run_folder: str) -> str:
    return f"{run_folder.rstrip('/')}/{SNAPSHOT_NAME}"


def load(run_folder: str) -> DataSnapshot | None:
    fs, path = fsspec.core.url_to_fs(snapshot_url(run_folder))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return DataSnapshot.from_json(f.read())


def save(run_folder: str, snap: DataSnapshot) -> str:
    fs, root = fsspec.core.url_to_fs(run_folder)
    fs.makedirs(root, exist_ok=True)
    url = snapshot_url(run_folder)
    with fsspec.open(url, "w") as f:
        f.write(snap.to_json())
    return url


def pin(run_folder: str, manifest_url: str, *, refresh: bool = False) -> tuple[DataSnapshot, Pinned]:
    """The run's snapshot: the one in ``run_folder`` when there is one, else (or with ``refresh``) a new one
    of the live manifest, for the caller to ``save`` there after checking it. A relaunch naming another shard folder without ``refresh`` is refused:
    the run would silently keep training on the pinned one."""
    pinned = load(run_folder)
    if pinned is not None and not refresh:
        given = manifest_url.rsplit("/", 1)[0] if manifest_url.endswith(".json") else manifest_url.rstrip("/")
        if given != pinned.folder:
            raise ValueError(
                f"data.manifest {manifest_url}: this run is pinned to {pinned.folder} ({snapshot_url(run_folder)}); "
                f"pass --data.refresh true to continue it on other data, or use another tracking.run_name"
            )
        live = take(manifest_url)
        if live.digest != pinned.digest:
            log.info("data: %s changed since the run started (generation %d -> %d); training on the snapshot "
                     "(data.refresh true moves the run to the new shards)", given, pinned.generation, live.generation)  # fmt: skip
        return pinned, "kept"
    snap = take(manifest_url)  # saved by the caller once it is known to fit the task (``save``)
    if pinned is not None:
        log.warning("data.refresh: run moved from snapshot %s (generation %d, %d samples) to %s (generation %d, %d "
                    "samples); the loader restarts its epoch", pinned.digest, pinned.generation, pinned.num_samples,
                    snap.digest, snap.generation, snap.num_samples)  # fmt: skip
        return snap, "refreshed"
    return snap, "new"


def check_needs(snap: DataSnapshot, *, task: str, mode: str, recipe_hash: str = "") -> None:
    """Refuse shards the task cannot train on, naming both sides: the manifest's mode (and the recipe's own
    ``mode`` where it records one) against the task's, and with a pinned ``data.recipe_hash`` the recipe too."""
    recipe_mode = snap.recipe.get("mode", snap.mode)
    if snap.mode != mode or recipe_mode != mode:
        raise ValueError(
            f"data.manifest {snap.folder}: the shards are {snap.mode!r} shards (recipe {snap.recipe_hash}, mode "
            f"{recipe_mode!r}); {task} trains on {mode!r} shards: preprocess with --mode {mode}"
        )
    if recipe_hash and snap.recipe_hash != recipe_hash:
        raise ValueError(
            f"data.recipe_hash: the shards in {snap.folder} were made by recipe {snap.recipe_hash}, the run asks "
            f"for {recipe_hash}"
        )
