"""The preprocessing job: raw videos on object storage -> WebDataset shards, exactly once, on Ray Data.

    run(cfg) -> Result         what jobs/preprocess.py calls (``python jobs/preprocess.py --input ... --output ...``)

Driver, in order:
    0. take the output folder's lease (``lease``: one writer per folder; another run's live lease ends this one)
    1. list the input, load manifest.json, and plan: resume the unfinished generation, or plan a new one with the
       new and changed sources (nothing new: say so and stop); ``--dry-run`` stops here
    2. rewrite older shards that hold samples of changed sources (``state`` explains why)
    3. stream the plan through the Ray Data graph (``stages``): probe -> decode -> resize -> log-mel -> encode ->
       write, one small result row per segment back to the driver
    4. as sources finish, pack them in plan order into shards of about ``shards.target_bytes``; a Ray task
       concatenates a shard's spooled parts, and the driver commits shards in order (manifest.json rewritten)
    5. close the generation, write stats.json, delete the work folder, return the summary

The driver holds metadata only. Results carry a few hundred bytes per segment; sample bytes go from the decode
actors to part files in the work folder, and from there, streamed once part after part, into the shard file by an
``assemble_shard`` task (rewrites of older shards too), which returns the shard's size, sha256 and keys. On an
object store that is two transfers per shard byte, both on the workers' links: the driver's link never caps the job
(``benchmarks/preprocess.py`` measures what the driver process reads and writes per GB of shards).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

import ray

from pipelines import manifests, writer
from pipelines.config import PreprocessConfig, ResourceConfig
from pipelines.failures import Retries, RetryPolicy, retrying, transient_reason
from pipelines.lease import Lease
from pipelines.rows import ResultRow
from pipelines.sources import list_sources
from pipelines.stages import DecodeStage, StageSettings, initial_row
from pipelines.stats import RunStats
from tvlt_core import shards
from tvlt_core.ray_session import connect_ray
from tvlt_core.redaction import redact_text

log = logging.getLogger(__name__)
GiB = 1024**3


class StoreUnavailable(RuntimeError):
    """The store failed the run itself (listing, a shard upload, a manifest commit) after every retry: nothing is
    lost (the next run resumes), but this run did not succeed."""


@dataclass
class Result:
    stats: list[RunStats]  # one per generation this run worked on
    plan_text: str = ""  # --dry-run: the plan, for the command line to print

    @property
    def quarantined(self) -> int:
        return sum(sum(s.quarantined.values()) for s in self.stats)

    @property
    def deferred(self) -> int:
        return sum(sum(s.deferred.values()) for s in self.stats)

    @property
    def failed_share(self) -> float:
        """(deferred + quarantined) / inputs processed by this run; 0 when it processed none."""
        inputs = sum(s.inputs for s in self.stats)
        return (self.deferred + self.quarantined) / inputs if inputs else 0.0

    def failure_summary(self) -> str:
        """One line: how many inputs failed, of which class, for which reasons."""
        deferred, quarantined = Counter(), Counter()
        for s in self.stats:
            deferred.update(s.deferred)
            quarantined.update(s.quarantined)

        def reasons(c: Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in c.most_common()) or "none"

        inputs = sum(s.inputs for s in self.stats)
        return (f"{self.deferred + self.quarantined} of {inputs} input(s) failed ({self.failed_share:.0%}): "
                f"{self.deferred} deferred ({reasons(deferred)}), {self.quarantined} quarantined "
                f"({reasons(quarantined)})")


# ------------------------------------------------------------------------------------------------------ Ray set-up
def decoder_count(res: ResourceConfig) -> int:
    """Decoders the cluster holds, or ``res.decoders``."""
    if res.decoders:
        return res.decoders
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, math.floor(cpus / res.decode_cpus))


def build_dataset(rows: list[dict], settings: StageSettings, res: ResourceConfig,
                  decode_stage: type = DecodeStage) -> ray.data.Dataset:
    """The graph: rows per source -> DecodeStage actors (probe, decode, resize, log-mel, encode and write per
    segment; ``stages`` says why those run in the decoder) -> one small result row per segment.
    ``benchmarks/preprocess.py`` passes a stage that does nothing, to time Ray Data's own share of this graph."""
    decoders = decoder_count(res)
    blocks = max(1, math.ceil(len(rows) / res.sources_per_block))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    return ds.flat_map(decode_stage, fn_constructor_kwargs={"settings": settings}, num_cpus=res.decode_cpus,
                       memory=int(res.decode_memory_gib * GiB),
                       compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decoders, initial_size=decoders))


# Concatenating parts into a shard is I/O: it reserves no CPU, so it runs beside decoders that hold every core.
# Idempotent (the shard is published whole under its fixed name), so a task lost with its worker is retried by Ray,
# and a transient store failure inside it by ``policy``.
@ray.remote(num_cpus=0, max_retries=2)
def assemble_shard(part_urls: list[str], shard_url: str, storage_options: dict, drop_prefixes: tuple[str, ...],
                   policy: RetryPolicy) -> dict:
    """``writer.concatenate`` in a Ray task, so the shard's bytes never pass through the driver; its result with
    ``retries``, the transient failures retried on the way."""
    counter = Retries()
    written = retrying(lambda: writer.concatenate(part_urls, shard_url, storage_options, drop_prefixes), policy,
                       f"writing {shard_url}", counter)
    return {**written, "retries": counter.count}
SHARD_STOP_S = 60.0  # after a failure: how long the driver waits for the assemblies it started to stop


# ------------------------------------------------------------------------------------------------------- packing
@dataclass
class _Source:
    row: dict
    n_segs: int = -1
    parts: dict[int, tuple[str, dict]] = field(default_factory=dict)  # seg -> (part url, encode summary)
    failure: dict | None = None

    @property
    def complete(self) -> bool:
        return self.failure is not None or (self.n_segs >= 0 and len(self.parts) == self.n_segs)

    def outcome(self) -> dict:
        """``{"samples", "lost_clips"}``, or a failure ``{"stage", "reason", "error", "lost_clips"}``."""
        if self.failure is not None:
            return self.failure
        summaries = [summary for _, (_, summary) in sorted(self.parts.items())]
        samples = sum(s["samples"] for s in summaries)
        lost = [c for s in summaries for c in s["lost"]]
        if samples == 0:
            if lost and len(lost) == sum(s["clips"] for s in summaries):
                return {"stage": "decode", "reason": "undecodable_video", "lost_clips": lost,
                        "error": f"damage makes every clip undecodable; clip {lost[0]['clip']}: {lost[0]['error']}"}
            dropped = sum(s["dropped_no_audio"] for s in summaries)
            reason = "no_audio" if dropped else "no_samples"
            return {"stage": "encode", "reason": reason, "lost_clips": lost,
                    "error": f"no clip gave a sample ({dropped} without audio, {len(lost)} undecodable)"}
        return {"samples": samples, "lost_clips": lost}


@dataclass
class _Shard:
    index: int
    outcomes: list[tuple[dict, dict]] = field(default_factory=list)
    part_urls: list[str] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0
    future: Future | None = None  # the shard file being assembled from its parts


class Packer:
    """Receives result rows in any order; packs finished sources in plan order into shards; commits in order."""

    def __init__(self, rows: list[dict], first_index: int, target_bytes: int, commit, start_shard):
        self.sources = [_Source(r) for r in rows]
        self.next = 0  # first plan position not yet packed
        self.index = first_index
        self.target = target_bytes
        self.current = _Shard(first_index)
        self.in_flight: list[_Shard] = []
        self._commit, self._start_shard = commit, start_shard

    def add(self, result: ResultRow) -> None:
        src = self.sources[result.order]
        log.debug("result: source %d segment %d%s", result.order, result.seg, " (failed)" if result.failure else "")
        if result.failure is not None:
            src.failure = result.failure
        else:
            src.n_segs = result.n_segs
            src.parts[result.seg] = (result.part_url, {**result.summary, "bytes": result.part_bytes})
        while self.next < len(self.sources) and self.sources[self.next].complete:
            self._pack(self.sources[self.next])
            self.next += 1
        self.commit_ready(block=False)

    def _pack(self, src: _Source) -> None:
        outcome = src.outcome()
        if "samples" in outcome:
            size = sum(s["bytes"] for _, s in src.parts.values())
            if self.current.samples and self.current.bytes + size > self.target:
                self._close()
            self.current.part_urls += [url for _, (url, s) in sorted(src.parts.items()) if url]
            self.current.samples += outcome["samples"]
            self.current.bytes += size
        self.current.outcomes.append((src.row, outcome))

    def _close(self) -> None:
        shard = self.current
        if shard.samples:
            shard.future = self._start_shard(shard)
            self.index += 1
        self.in_flight.append(shard)
        self.current = _Shard(self.index)

    def finish(self) -> None:
        if self.next < len(self.sources):
            missing = [s.row["uri"] for s in self.sources[self.next:] if not s.complete]
            raise RuntimeError(f"{len(missing)} planned source(s) gave no result, e.g. {redact_text(missing[0])}")
        if self.current.outcomes:
            self._close()
        self.commit_ready(block=True)

    def commit_ready(self, block: bool) -> None:
        """Commit finished shards from the head of the queue (in order, so commits always cover a plan prefix)."""
        while self.in_flight:
            head = self.in_flight[0]
            if head.future is not None and not (block or head.future.done()):
                return
            self._commit(head, head.future.result() if head.future is not None else None)
            self.in_flight.pop(0)


# --------------------------------------------------------------------------------------------------------- the run
class Job:
    """One invocation: plans, then runs at most the pending generation and one new one."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        options = cfg.storage.options(cfg.output)
        self.lease = Lease(cfg.output, options, cfg.lease)
        self.out = manifests.Output(cfg.output, options, lease=None if cfg.dry_run else self.lease)
        self.mode_recipe = cfg.mode_recipe()
        self.recipe = self.mode_recipe.describe()
        self.recipe_hash = shards.recipe_hash(self.recipe)
        self.started_ray = False
        self.read_urls: dict[str, str] = {}
        self.retries = Retries()  # the driver's own (listing, shards, commits); workers report theirs per result

    def store(self, fn, what: str):
        """``fn()``, a call to the store from the driver, retried on transient failures (``cfg.failures``)."""
        return retrying(fn, self.cfg.failures.policy(), what, self.retries)

    def list_rows(self) -> list[dict]:
        cfg = self.cfg
        sources = self.store(lambda: list_sources(cfg.input, cfg.sources, cfg.storage), f"listing {cfg.input}")
        # Signed URLs are read from the current listing only (a resumed plan holds none: they are credentials).
        self.read_urls = {s.uri: s.read_url for s in sources if s.read_url}
        return self.mode_recipe.plan_rows(sources, cfg.storage)

    def run(self) -> Result:
        """Take the output folder's lease first (``LeaseHeld``: another run is writing there, and this one does
        nothing), then plan and execute; the lease is released when the run ends. A dry run writes nothing and
        takes no lease. A store that still fails after every retry stops the run (``StoreUnavailable``)."""
        try:
            if self.cfg.dry_run:
                return self.plan_and_execute()
            with self.lease:
                return self.plan_and_execute()
        except Exception as e:
            reason = transient_reason(e)
            if not reason:
                raise
            raise StoreUnavailable(redact_text(
                f"the store failed after {self.cfg.failures.attempts} attempt(s) ({reason}: {e}); nothing "
                "committed is lost, the next run resumes")) from e

    def plan_and_execute(self) -> Result:
        cfg, t0 = self.cfg, time.perf_counter()
        manifest = self.store(self.out.load, "loading the manifest")
        if manifest is not None:
            manifests.check_recipe(manifest, cfg.mode, self.recipe, cfg.output)
        rows = self.list_rows()
        log.info("listed %d source(s) under %s", len(rows), redact_text(cfg.input))
        results: list[RunStats] = []
        try:
            if manifest is not None and manifest.pending is not None:
                plan = self.out.load_plan(manifest.pending.id)
                stats = RunStats(listed=len(rows), planned=len(plan.sources))
                if cfg.dry_run:
                    return Result([stats], self.describe(plan, None, manifest, resume=True))
                results.append(self.execute(manifest, plan, stats, t0))
                t0 = time.perf_counter()
            d = manifests.diff(manifest, rows, cfg.retry_quarantined)
            stats = RunStats(listed=len(rows), new=len(d.new), changed=len(d.changed), unchanged=d.unchanged,
                             gone=len(d.gone), retry=len(d.retry))
            if not d.new and not d.changed and not d.retry:
                stats.generation, stats.status = (manifest.generation if manifest else 0), "nothing_to_do"
                log.info("nothing new or changed since generation %d: %d source(s) unchanged; nothing to do",
                         stats.generation, d.unchanged)
                return Result(results or [stats])
            plan = self.new_plan(manifest, d)
            stats.planned = len(plan.sources)
            if cfg.dry_run:
                stats.status = "dry_run"
                return Result([stats], self.describe(plan, d, manifest, resume=False))
            results.append(self.execute(manifest, plan, stats, t0))
            return Result(results)
        finally:
            if self.started_ray:
                ray.shutdown()

    def new_plan(self, manifest: shards.Manifest | None, d: manifests.Diff) -> manifests.Plan:
        sources = sorted(d.new + d.changed + d.retry, key=lambda r: (r["sid"], r["uri"]))
        changed = sorted(r["uri"] for r in d.changed)
        rewrite = sorted({manifest.sources[u]["shard"] for u in changed
                          if manifest.sources[u].get("status") == "ok" and manifest.sources[u].get("shard")})
        return manifests.Plan(generation=(manifest.generation if manifest else 0) + 1, sources=sources,
                          rewrite=rewrite, changed=changed)

    def describe(self, plan: manifests.Plan, d: manifests.Diff | None, manifest, resume: bool) -> str:
        lines = [f"output {redact_text(self.cfg.output)}: mode {self.cfg.mode}, recipe {self.recipe_hash}"]
        if resume:
            done = manifests.committed_in(manifest, plan.generation)
            lines.append(f"resume generation {plan.generation}: {len(plan.sources) - len(done)} of "
                         f"{len(plan.sources)} planned source(s) still to do")
        else:
            lines.append(f"generation {plan.generation}: {len(d.new)} new, {len(d.changed)} changed, "
                         f"{d.unchanged} unchanged, {len(d.gone)} no longer listed (kept)"
                         + (f", {len(d.retry)} deferred or quarantined before, to retry" if d.retry else ""))
        if plan.rewrite:
            lines.append(f"rewrite {len(plan.rewrite)} shard(s) without the changed sources' old samples")
        lines += [f"  {redact_text(r['uri'])}" for r in plan.sources[:20]]
        if len(plan.sources) > 20:
            lines.append(f"  ... and {len(plan.sources) - 20} more")
        lines.append(f"shards of about {self.cfg.shards.target_bytes:,} bytes; nothing was written (--dry-run)")
        return "\n".join(lines)

    # ---- executing a generation
    def execute(self, manifest: shards.Manifest | None, plan: manifests.Plan, stats: RunStats, t0: float) -> RunStats:
        cfg, out = self.cfg, self.out
        if not self.started_ray and not ray.is_initialized():
            res = cfg.resources
            self.started_ray = connect_ray(cpus=res.local_cpus, object_store_bytes=int(res.object_store_gib * GiB))
        if manifest is None:
            manifest = shards.Manifest(mode=cfg.mode, recipe=self.recipe, recipe_hash=self.recipe_hash)
        if manifest.pending is None:
            self.store(lambda: out.save_plan(plan), "writing the plan")
            gen = manifests.begin(manifest, plan)
        else:
            gen = manifest.pending
            gen.attempts += 1
            self.store(lambda: out.remove_orphans(manifest, gen.id), "removing orphans")
        self.store(lambda: out.save(manifest), "committing the manifest")
        stats.generation, stats.attempt = gen.id, gen.attempts
        self.rewrite(manifest, gen, plan, stats)
        done = manifests.committed_in(manifest, gen.id)
        todo = [r for r in plan.sources if r["uri"] not in done]
        stats.skipped, stats.inputs = len(plan.sources) - len(todo), len(todo)
        log.info("generation %d: %d source(s) to process%s", gen.id, len(todo),
                 f" ({stats.skipped} already committed)" if stats.skipped else "")
        stats.startup_s = time.perf_counter() - t0
        if todo:
            self.process(manifest, gen, plan, todo, stats, t0)
        gen.finished, gen.plan = manifests.now(), ""  # the plan goes with the work folder
        self.store(lambda: out.save(manifest), "committing the manifest")
        stats.status, stats.wall_s = "done", time.perf_counter() - t0
        stats.retried, self.retries.count = stats.retried + self.retries.count, 0
        all_stats = self.store(out.load_stats, "loading stats.json")
        all_stats["generations"][str(gen.id)] = stats.to_json()
        all_stats["last_run"] = stats.to_json()
        self.store(lambda: out.save_stats(all_stats), "writing stats.json")
        self.store(out.finish, "deleting the work folder")
        return stats

    def rewrite(self, manifest: shards.Manifest, gen: shards.Generation, plan: manifests.Plan, stats: RunStats) -> None:
        """Drop the changed sources' old samples: rewrite each older shard holding some, then commit."""
        listed = {s.name: s for s in manifest.shards}
        changed = set(plan.changed)
        prefixes = tuple(f"{shards.source_id(u)}_" for u in plan.changed)
        for i, old in enumerate(plan.rewrite):
            if old not in listed:
                continue  # done by an earlier attempt
            name = shards.shard_name(gen.id, i)
            res = ray.get(assemble_shard.remote([self.out.path(old)], self.out.path(name), self.out.options,
                                                prefixes, self.cfg.failures.policy()))
            self.retries.count += res.pop("retries")
            new = (shards.ShardEntry(name=name, samples=len(res["keys"]), bytes=res["bytes"], generation=gen.id,
                                     sha256=res["sha256"]) if res["keys"] else None)
            if new is None:
                self.store(lambda: writer.remove([self.out.path(name)], self.out.options), f"removing {name}")
            manifests.apply_rewrite(manifest, gen, old, new, changed)
            self.store(lambda: self.out.save(manifest), "committing the manifest")
            stats.rewritten_shards += 1
            log.info("rewrote %s as %s without %d changed source(s)", old, name if new else "(nothing left)",
                     len(changed))

    def process(self, manifest: shards.Manifest, gen: shards.Generation, plan: manifests.Plan, todo: list[dict],
                stats: RunStats, t0: float) -> None:
        cfg, out = self.cfg, self.out
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.progress
        settings = StageSettings(recipe=self.mode_recipe, storage=cfg.storage, recipe_hash=self.recipe_hash,
                                 work_url=f"{out.work_url(gen.id)}/run-{self.lease.run_id}",
                                 decode_timeout_s=cfg.resources.decode_timeout_s, limits=cfg.limits,
                                 clips_per_row=cfg.resources.clips_per_row, scratch_dir=cfg.resources.scratch_dir,
                                 retry=cfg.failures.policy())
        graph_rows = [initial_row(r, i, self.read_urls.get(r["uri"], "")) for i, r in enumerate(todo)]
        reasons: Counter = Counter()
        deferred: Counter = Counter()

        # Shards are assembled by Ray tasks while results keep coming: the bytes never pass through the driver. The
        # first task starts a worker process (about a second), overlapped with decoding unless the run is one shard.
        assembling: list[ray.ObjectRef] = []

        def start_shard(shard: _Shard) -> Future:
            url = out.path(shards.shard_name(gen.id, shard.index))
            assembling.append(assemble_shard.remote(shard.part_urls, url, out.options, (), cfg.failures.policy()))
            return assembling[-1].future()

        def commit(shard: _Shard, written: dict | None) -> None:
            entry = None
            if written is not None:
                self.retries.count += written["retries"]
                entry = shards.ShardEntry(name=shards.shard_name(gen.id, shard.index), samples=len(written["keys"]),
                                          bytes=written["bytes"], generation=gen.id, sha256=written["sha256"])
                stats.shards += 1
                stats.samples += entry.samples
                stats.bytes += entry.bytes
            manifests.record_sources(manifest, gen, entry, shard.outcomes, cfg.failures.crash_runs)
            self.store(lambda: out.save(manifest), "committing the manifest")
            for row, outcome in shard.outcomes:
                if "reason" in outcome:
                    status = manifest.sources[row["uri"]]["status"]
                    (deferred if status == "deferred" else reasons)[outcome["reason"]] += 1
                elif outcome["lost_clips"]:
                    stats.salvaged += 1
                stats.lost_clips.update(c["reason"] for c in outcome.get("lost_clips", []))
            self.store(lambda: writer.remove(shard.part_urls, out.options), "removing spooled parts")
            log.info("committed %s: %d source(s), %d sample(s); %d/%d sources done",
                     entry.name if entry else "no shard", len(shard.outcomes), entry.samples if entry else 0,
                     len(manifests.committed_in(manifest, gen.id)), gen.inputs)

        # Rewritten shards take indices 0..len(rewrite)-1; packed shards follow, continuing after a restart.
        taken = [shards.shard_index(s.name) for s in manifest.shards if s.generation == gen.id]
        first_index = max([len(plan.rewrite)] + [i + 1 for i in taken])
        packer = Packer(todo, first_index, cfg.shards.target_bytes, commit, start_shard)
        dataset = build_dataset(graph_rows, settings, cfg.resources)
        try:
            for row in dataset.iter_rows():
                result = ResultRow.from_row(row)
                stats.first_result_s = stats.first_result_s or time.perf_counter() - t0
                stats.retried += result.retries
                packer.add(result)
                for stage, seconds in result.timing.items():
                    stats.stage_seconds[stage] = stats.stage_seconds.get(stage, 0.0) + seconds
                if result.failure is None:
                    stats.clips += result.summary["clips"]
                    if result.seg == 0:
                        stats.video_seconds += result.summary["duration"]
            packer.finish()
        except BaseException:
            stop_all(assembling)  # nothing of this run writes shards after it has failed
            raise
        log.debug("Ray Data stage times:\n%s", dataset.stats())
        log.info("seconds per stage, summed over workers: %s",
                 ", ".join(f"{k} {v:.1f}" for k, v in sorted(stats.stage_seconds.items(), key=lambda kv: -kv[1])))
        stats.quarantined, stats.deferred = reasons, deferred


def stop_all(tasks: list[ray.ObjectRef]) -> None:
    """Cancel the tasks still running and wait (at most ``SHARD_STOP_S``) until every one has ended."""
    _, running = ray.wait(tasks, num_returns=len(tasks), timeout=0)
    for ref in running:
        ray.cancel(ref)
    _, left = ray.wait(running, num_returns=len(running), timeout=SHARD_STOP_S)
    if left:
        log.warning("%d shard assembly task(s) did not stop within %g s", len(left), SHARD_STOP_S)


def run(cfg: PreprocessConfig) -> Result:
    """Plan and run the preprocessing job described by ``cfg`` (see the module docstring)."""
    return Job(cfg).run()
