"""Run statistics: what a run did, as the summary table printed at the end and the entry kept in stats.json."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class RunStats:
    """Counts of one run (one generation, or a resumed part of one). Rates use this run's wall time."""

    generation: int = 0
    status: str = ""  # done | nothing_to_do | dry_run
    listed: int = 0
    new: int = 0
    changed: int = 0
    retry: int = 0  # deferred by an earlier run (or quarantined, with --retry-quarantined): planned again
    unchanged: int = 0
    gone: int = 0
    planned: int = 0  # sources of the generation
    skipped: int = 0  # already committed by an earlier, interrupted attempt
    inputs: int = 0  # sources this run processed
    clips: int = 0
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    rewritten_shards: int = 0
    video_seconds: float = 0.0
    quarantined: Counter = field(default_factory=Counter)  # reason -> count
    salvaged: int = 0  # sources kept with some clips lost to damage
    lost_clips: Counter = field(default_factory=Counter)  # reason -> clips lost (of kept and quarantined sources)
    deferred: Counter = field(default_factory=Counter)  # transient reason -> count: the next run retries them
    retried: int = 0  # transient failures retried within the run (driver and workers; botocore's own not counted)
    stage_seconds: dict = field(default_factory=dict)  # stage -> seconds summed over workers
    wall_s: float = 0.0
    startup_s: float = 0.0  # listing, plan (and Ray start-up when the job starts Ray), before the graph runs
    first_result_s: float = 0.0  # from the start until the first segment came back: includes actor start-up
    attempt: int = 1

    @property
    def videos_per_s(self) -> float:
        return self.inputs / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def video_s_per_s(self) -> float:
        return self.video_seconds / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["quarantined"] = dict(sorted(self.quarantined.items()))
        data["lost_clips"] = dict(sorted(self.lost_clips.items()))
        data["deferred"] = dict(sorted(self.deferred.items()))
        data["stage_seconds"] = {k: round(v, 3) for k, v in sorted(self.stage_seconds.items())}
        data.update(videos_per_s=round(self.videos_per_s, 3), video_s_per_s=round(self.video_s_per_s, 2))
        return data

    def table(self) -> str:
        """The end-of-run summary, one metric per line."""
        rows = [
            ("generation", f"{self.generation} ({self.status}"
                           + (f", attempt {self.attempt})" if self.attempt > 1 else ")")),
            ("sources listed", f"{self.listed}: {self.new} new, {self.changed} changed, {self.unchanged} unchanged"
                               + (f", {self.retry} to retry" if self.retry else "")
                               + (f", {self.gone} gone (samples kept)" if self.gone else "")),
            ("inputs processed", f"{self.inputs}" + (f" (+{self.skipped} committed before a restart)"
                                                     if self.skipped else "")),
            ("clips", f"{self.clips}"),
            ("samples", f"{self.samples}"),
            ("shards", f"{self.shards}" + (f" (+{self.rewritten_shards} rewritten)" if self.rewritten_shards else "")),
            ("bytes", f"{self.bytes:,} ({self.bytes / 1e6:.1f} MB)"),
            ("quarantined", f"{sum(self.quarantined.values())}"),
        ]
        rows += [(f"  {reason}", f"{n}") for reason, n in sorted(self.quarantined.items())]
        if self.lost_clips:
            rows.append(("clips lost to damage", f"{sum(self.lost_clips.values())} (kept the rest of "
                                                 f"{self.salvaged} source(s))"))
        rows.append(("deferred (next run retries)", f"{sum(self.deferred.values())}"))
        rows += [(f"  {reason}", f"{n}") for reason, n in sorted(self.deferred.items())]
        rows.append(("transient failures retried", f"{self.retried}"))
        rows += [
            ("wall time", f"{self.wall_s:.1f} s (plan and start-up {self.startup_s:.1f} s, first result after "
                          f"{self.first_result_s:.1f} s)"),
            ("videos/s", f"{self.videos_per_s:.2f}"),
            ("video s per s", f"{self.video_s_per_s:.1f} ({self.video_seconds:.1f} s of video)"),
        ]
        if self.stage_seconds:
            busiest = sorted(self.stage_seconds.items(), key=lambda kv: -kv[1])
            rows.append(("stage seconds", ", ".join(f"{k} {v:.1f}" for k, v in busiest)))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
