"""Preprocessing job: raw videos (local folder, s3:// prefix, glob or list file) -> WebDataset shards.

    python jobs/preprocess.py --input /data/videos --output /data/shards/pretrain --mode pretrain
    python jobs/preprocess.py --config preprocess_grounding --input s3://raw/charades --output s3://shards/charades \
        --mode grounding --grounding.annotations '[s3://raw/charades/charades_sta_train.txt]'
    ray job submit --working-dir . -- python jobs/preprocess.py --input s3://raw/videos --output s3://shards/pt \
        --mode pretrain
    python jobs/preprocess.py ... --dry-run               # print the plan, write nothing
    python jobs/preprocess.py ... --fail-on-quarantine    # exit 1 when any input was quarantined
    python jobs/preprocess.py ... --retry-quarantined     # plan quarantined inputs again (a new decoder, say)

Settings: pipelines/config.py (``--clips.length_s 10``, ``--shards.target_bytes 268435456``, caps on what one input
may cost: ``--limits.max_duration_s 10800``, ``--limits.decoder_memory_gib 1.0``, ...); presets in
jobs/configs/preprocess_*.yaml. Re-running with the same arguments resumes an interrupted run or, when the input
has new or changed videos, appends a generation; with nothing new it says so and exits 0.
Exit codes: 0 done (quarantined and deferred inputs included, up to failures.max_failed_share), 1 quarantined
inputs with --fail-on-quarantine, 2 bad config, 3 the run failed: more than failures.max_failed_share of its inputs
were deferred or quarantined, or the store failed listing or a commit after every retry (the next run resumes),
4 another run holds the output folder's lease (nothing was done; the message names it and when its lease expires),
5 this run lost the folder mid-run (its lease lapsed, or another writer committed): what it committed stays, rerun.
"""

from __future__ import annotations

import logging

from jobs.cli import run
from jobs.config import RESOLVED_NAME, ConfigError, dump, parse
from pipelines import writer
from pipelines.config import PreprocessConfig
from pipelines.lease import LeaseHeld, LeaseLost
from pipelines.preprocess import StoreUnavailable
from pipelines.preprocess import run as run_pipeline
from pipelines.sources import InputNotFound
from pipelines.manifests import ManifestConflict, RecipeMismatch

log = logging.getLogger("preprocess")
# The spelling of the two switches; the config parser knows them as booleans.
FLAGS = {"--dry-run": "--dry_run=true", "--fail-on-quarantine": "--fail_on_quarantine=true",
         "--retry-quarantined": "--retry_quarantined=true"}
RUN_FAILED, EXIT_HELD, EXIT_LOST = 3, 4, 5


def main(argv: list[str] | None = None) -> int:
    argv = [FLAGS.get(arg, arg) for arg in (argv or [])]
    return run_preprocessing(parse(PreprocessConfig, argv, prog="preprocess", description=__doc__.split("\n\n")[0]))


def run_preprocessing(cfg: PreprocessConfig) -> int:
    """The job without its command line (the main job calls it): the run, its tables, the exit code above."""
    try:
        result = run_pipeline(cfg)
    except (RecipeMismatch, InputNotFound) as e:
        raise ConfigError(f"preprocess: {e}") from e
    except StoreUnavailable as e:
        log.error("preprocess failed: %s", e)
        return RUN_FAILED
    except LeaseHeld as e:
        log.error("%s", e)
        return EXIT_HELD
    except (LeaseLost, ManifestConflict) as e:
        log.error("%s", e)
        return EXIT_LOST
    if result.plan_text:
        print(result.plan_text, flush=True)
    else:  # the resolved config beside the shards, secrets masked (through the job's storage options)
        url = f"{cfg.output.rstrip('/')}/{RESOLVED_NAME}"
        writer.publish_text(url, dump(cfg), cfg.storage.options(url))
    for stats in result.stats:
        print(stats.table(), flush=True)
    if result.failed_share > cfg.failures.max_failed_share:
        log.error("preprocess failed: %s, more than failures.max_failed_share=%s. Deferred inputs are retried by "
                  "the next run; see manifest.json and quarantine.jsonl", result.failure_summary(),
                  cfg.failures.max_failed_share)
        return RUN_FAILED
    if cfg.fail_on_quarantine and result.quarantined:
        log.error("%d input(s) quarantined (--fail-on-quarantine); see quarantine.jsonl", result.quarantined)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
