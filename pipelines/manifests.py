"""Output state across runs: manifest.json is the single source of truth; generations make re-runs exact.

    <output>/manifest.json            committed shards, generations, every source's version and outcome
    <output>/quarantine.jsonl         view: sources whose latest attempt failed, and clips lost to damage in sources
                                      that were kept (rewritten after each commit)
    <output>/stats.json               view: per-generation counts and rates
    <output>/shard-GGGGGG-NNNNN.tar   committed shards
    <output>/_work/gen-GGGGGG/        plan.json and spooled parts of the generation in progress (deleted when done),
                                      the parts in ``run-<run id>/`` per attempt
    <output>/_lease.json              who is writing the folder, until when (``lease``: one writer per folder)

Exactly once under SIGKILL: a run writes its plan (the sorted new/changed sources) before any work and adds an
unfinished generation to the manifest. Shards are packed from sources in plan order and committed in that order,
each commit rewriting manifest.json atomically with the shard and the outcome of every source it covers. A restart
finds the unfinished generation, reloads its plan, skips the sources already committed (a prefix of the plan),
deletes orphans (temporaries, shards of this generation that no manifest lists) and carries on with the same shard
names. Incremental runs compare each listed source's (size, etag, mtime) (and, for grounding, its queries) with
the manifest: only new or changed sources are planned. Older samples of a changed source are removed by rewriting
the shards that hold them (the old shard files are kept, listed in ``Generation.retired``, for readers still on an
older manifest).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pipelines import conditional, failures, writer
from pipelines.annotations import Query, queries_hash
from pipelines.lease import LEASE_NAME, Lease
from pipelines.sources import Source, join
from tvlt_core import shards
from tvlt_core.redaction import redact_text

log = logging.getLogger(__name__)
WORK_DIR = "_work"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Plan:
    """The work of one generation, fixed when it starts so that a restart redoes exactly the same."""

    generation: int
    sources: list[dict]  # Source rows + "annotations"/"queries" (grounding), in plan order (sorted by source id)
    rewrite: list[str] = field(default_factory=list)  # older shards holding samples of changed sources
    changed: list[str] = field(default_factory=list)  # URIs of changed sources

    def to_json(self) -> str:
        return json.dumps({"generation": self.generation, "sources": self.sources, "rewrite": self.rewrite,
                           "changed": self.changed}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))


@dataclass
class Diff:
    new: list[dict]
    changed: list[dict]
    unchanged: int
    gone: list[str]  # in the manifest, no longer listed (their samples are kept)
    retry: list[dict] = field(default_factory=list)  # deferred last time (or quarantined, with retry_quarantined)


def _version(row: dict) -> tuple:
    return row["size"], row["etag"], row["mtime"], row.get("annotations", "")


def diff(manifest: shards.Manifest | None, rows: list[dict], retry_quarantined: bool = False) -> Diff:
    """Split listed source rows into new, changed, to retry and unchanged against the manifest's record of each
    source. Deferred sources are retried whatever their version (a changed one is retried as changed: its old
    samples may need removing); quarantined ones only with ``retry_quarantined``."""
    known = manifest.sources if manifest else {}
    again = {"deferred", "quarantined"} if retry_quarantined else {"deferred"}
    new, changed, retry, unchanged = [], [], [], 0
    for row in rows:
        entry = known.get(row["uri"])
        if entry is None:
            new.append(row)
        elif _version(row) != (entry.get("size"), entry.get("etag"), entry.get("mtime"), entry.get("annotations", "")):
            changed.append(row)
        elif entry.get("status") in again:
            retry.append(row)
        else:
            unchanged += 1
    listed = {r["uri"] for r in rows}
    return Diff(new, changed, unchanged, sorted(u for u in known if u not in listed), retry)


def plan_rows(sources: list[Source], annotations: dict[str, list[dict]] | None = None) -> list[dict]:
    """Plan rows of listed sources; grounding rows carry their queries and a hash of them."""
    rows = []
    for s in sources:
        row = {"uri": s.uri, "sid": s.sid, "size": s.size, "etag": s.etag, "mtime": s.mtime,
               "version_id": s.version_id, "extra": json.dumps(s.extra, sort_keys=True)}
        if annotations is not None:
            queries = annotations[s.uri]
            row["queries"] = json.dumps(queries)
            row["annotations"] = queries_hash([Query(**q) for q in queries])
        rows.append(row)
    return rows


class ManifestConflict(RuntimeError):
    """manifest.json changed since this run read it: another writer committed in between. Nothing was overwritten."""


class Output:
    """The output folder: reads and atomically rewrites manifest.json and its views; knows where things go.

    Every manifest commit is a compare-and-swap on the version this run last read or wrote (S3: ``If-Match`` on the
    ETag; locally the content hash under a lock, ``pipelines.conditional``), made only while ``lease`` (when given)
    still holds: a second writer's commit is detected (``ManifestConflict``), never overwritten."""

    def __init__(self, url: str, storage_options: dict, lease: Lease | None = None):
        self.url = url.rstrip("/")
        self.options = storage_options
        self.lease = lease
        self.manifest_version = ""  # of manifest.json as this run last read or wrote it; "" = there was none

    def path(self, name: str) -> str:
        return join(self.url, name)

    def work_url(self, generation: int) -> str:
        return self.path(f"{WORK_DIR}/{shards.generation_folder(generation)}")

    def plan_url(self, generation: int) -> str:
        return f"{self.work_url(generation)}/plan.json"

    def check_lease(self) -> None:
        """Before anything that changes the folder's state: ``LeaseLost`` once this run no longer holds it."""
        if self.lease is not None:
            self.lease.check()

    # ---- manifest and its views
    def load(self) -> shards.Manifest | None:
        try:
            data, self.manifest_version = conditional.read(self.path(shards.MANIFEST_NAME), self.options)
        except FileNotFoundError:
            self.manifest_version = ""
            return None
        return shards.Manifest.from_json(data.decode())

    def save(self, manifest: shards.Manifest) -> None:
        """manifest.json first (the commit point, conditional on the version last seen), then the quarantine view
        derived from it: quarantined sources and the clips damage cost kept ones (deferred sources are not in it:
        they are not the input's fault, and the next run retries them)."""
        self.check_lease()
        url, data = self.path(shards.MANIFEST_NAME), manifest.to_json().encode()
        try:
            if self.manifest_version:
                self.manifest_version = conditional.replace(url, data, self.manifest_version, self.options)
            else:
                self.manifest_version = conditional.create(url, data, self.options)
        except conditional.Conflict as e:
            raise ManifestConflict(
                f"{redact_text(url)} was changed by another writer since this run read it ({e}); this run's commit "
                "was not written. Only one run may write to an output folder at a time (the lease in "
                f"{LEASE_NAME} enforces it): rerun once the other run has finished."
            ) from e
        lines = "".join(r.to_json() + "\n" for r in manifest.quarantine() + manifest.lost_clips())
        writer.publish_text(self.path(shards.QUARANTINE_NAME), lines, self.options)

    def save_stats(self, stats: dict) -> None:
        writer.publish_text(self.path(shards.STATS_NAME), json.dumps(stats, indent=1, sort_keys=True), self.options)

    def load_stats(self) -> dict:
        try:
            return json.loads(writer.read_bytes(self.path(shards.STATS_NAME), self.options))
        except FileNotFoundError:
            return {"generations": {}}

    # ---- plans
    def save_plan(self, plan: Plan) -> None:
        self.check_lease()
        writer.publish_text(self.plan_url(plan.generation), plan.to_json(), self.options)

    def load_plan(self, generation: int) -> Plan:
        return Plan.from_json(writer.read_bytes(self.plan_url(generation), self.options).decode())

    # ---- cleanup
    def remove_orphans(self, manifest: shards.Manifest, generation: int) -> list[str]:
        """Delete what a killed run left that no manifest lists: temporaries and this generation's shards."""
        self.check_lease()
        listed = {s.name for s in manifest.shards}
        prefix = shards.shard_prefix(generation)
        orphans = []
        for url in writer.list_files(self.url, self.options):
            name = url.rsplit("/", 1)[1]
            if writer.TMP_MARK in name or (name.startswith(prefix) and name not in listed):
                orphans.append(url)
        writer.remove(orphans, self.options)
        aborted = writer.abort_uploads(self.url, self.options)
        if orphans or aborted:
            log.info("removed %d orphan file(s) and %d open upload(s) of an interrupted run", len(orphans), aborted)
        return orphans

    def finish(self) -> None:
        """Delete the work folder: one generation runs at a time, and the finished one needs nothing from it."""
        self.check_lease()
        writer.remove_tree(self.path(WORK_DIR), self.options)


class RecipeMismatch(ValueError):
    """The configuration would write samples of another recipe into an existing output folder."""


def check_recipe(manifest: shards.Manifest, mode: str, recipe: dict, url: str) -> None:
    """An output folder holds one recipe: mixing samples made differently would be silent corruption."""
    digest = shards.recipe_hash(recipe)
    if manifest.mode != mode or manifest.recipe_hash != digest:
        changed = sorted(k for k in set(recipe) | set(manifest.recipe) if recipe.get(k) != manifest.recipe.get(k))
        raise RecipeMismatch(
            f"output {redact_text(url)} was written in mode {manifest.mode!r} with recipe {manifest.recipe_hash}; "
            f"this configuration gives mode {mode!r}, recipe {digest} (differs in: {', '.join(changed) or 'mode'}). "
            "Write to a new --output, or restore the settings."
        )


def begin(manifest: shards.Manifest, plan: Plan) -> shards.Generation:
    gen = shards.Generation(id=plan.generation, started=now(), inputs=len(plan.sources),
                            plan=f"{WORK_DIR}/{shards.generation_folder(plan.generation)}/plan.json")
    manifest.generations.append(gen)
    return gen


def apply_rewrite(manifest: shards.Manifest, gen: shards.Generation, old: str, new: shards.ShardEntry | None,
                  changed: set[str]) -> None:
    """Replace shard ``old`` by ``new`` (its samples minus the changed sources'), in the manifest only."""
    manifest.shards = [s for s in manifest.shards if s.name != old]
    if new is not None:
        manifest.shards.append(new)
        gen.shards += 1
    gen.retired.append(old)
    for uri, entry in manifest.sources.items():
        if entry.get("shard") == old:
            if uri in changed:
                entry.update(status="pending", shard="", samples=0)
            else:
                entry["shard"] = new.name if new is not None else ""


def record_sources(manifest: shards.Manifest, gen: shards.Generation, shard: shards.ShardEntry | None,
                   outcomes: list[tuple[dict, dict]], crash_runs: int = 3) -> None:
    """Commit ``shard`` (if any) and the outcome of each (plan row, outcome) it covers into the manifest.

    outcome: ``{"samples": n}`` for a good source, or ``{"stage", "reason", "error", "deferred"}`` for one that
    failed: quarantined, or deferred (a transient failure; ``deferrals`` counts the runs in a row that deferred it).
    A decoder crash deferred ``crash_runs`` runs in a row is quarantined instead: a file that crashes the decoder
    every time would otherwise be retried forever. Either may hold ``lost_clips``
    (``[{"clip", "start", "end", "reason", "error"}]``): the clips damage cost it.
    """
    if shard is not None:
        manifest.shards.append(shard)
        gen.shards += 1
        gen.samples += shard.samples
        gen.bytes += shard.bytes
    for row, outcome in outcomes:
        entry = {"size": row["size"], "etag": row["etag"], "mtime": row["mtime"], "generation": gen.id}
        if row.get("version_id"):  # read by this VersionId (a versioned bucket with storage.version_aware)
            entry["version_id"] = row["version_id"]
        if row.get("annotations"):
            entry["annotations"] = row["annotations"]
        if "reason" in outcome:
            deferrals = manifest.sources.get(row["uri"], {}).get("deferrals", 0) + 1 if outcome.get("deferred") else 0
            if outcome["reason"] == failures.DECODER_CRASH and deferrals >= crash_runs:
                deferrals = 0  # quarantined: the input is the likely cause
            status = "deferred" if deferrals else "quarantined"
            entry.update(status=status, stage=outcome["stage"], reason=outcome["reason"], error=outcome["error"])
            if deferrals:
                entry["deferrals"] = deferrals
                gen.deferred += 1
            else:
                gen.quarantined += 1
        else:
            entry.update(status="ok", samples=outcome["samples"], shard=shard.name if shard else "")
        if outcome.get("lost_clips"):
            entry["lost_clips"] = outcome["lost_clips"]
        manifest.sources[row["uri"]] = entry


def committed_in(manifest: shards.Manifest, generation: int) -> set[str]:
    """URIs whose outcome generation ``generation`` has already committed."""
    return {u for u, e in manifest.sources.items()
            if e.get("generation") == generation and e.get("status") != "pending"}
