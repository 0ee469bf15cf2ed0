"""The Ray Data engine of GRIT construction: the step functions of grit.py, spread over a Ray cluster.

    pending InputShards ──► from_items (one row per shard)
      ──map(TextStage)       CPU actors: read_shard + text_stage (spaCy loaded once per actor)
      ──map(DetectorStage)   actors holding the detector; one GPU each when the cluster has GPUs
      ──map(write_stage)     write_shard: parquet + tar to temporary names, renamed
      ──► the driver commits each finished shard to manifest.json, as the local engine does

Same shards, same step functions, same manifest: a build can be started with one engine and resumed with the
other, and both give the same records. On a multi-machine cluster the output folder must be on storage that
every node and the driver see at the same path (NFS, a mounted bucket), since the write stage runs on the
nodes.
Models are loaded on the nodes from `detector_path`, which must exist there too.

Ray is optional (`pip install 'kosmos2[grit]'`); it is imported when this engine runs.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from collections.abc import Callable
from typing import Any

from kosmos2.data.detectors import Detector
from kosmos2.data.grit import (
    BuildProgress,
    BuildSettings,
    BuildSummary,
    build_detector,
    detector_stage,
    iter_pending,
    load_text_pipeline,
    prepare,
    read_shard,
    text_stage,
    write_shard,
)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError(
            "--engine ray needs Ray Data, which is not installed: pip install 'kosmos2[grit]' (with -c "
            "constraints.txt for the pinned version), or use the local engine with --workers N"
        ) from e
    return ray


class TextStage:
    """Ray actor: an input shard (pickled InputShard) -> its pairs and their caption parses (pickled)."""

    def __init__(self, settings: BuildSettings) -> None:
        self.nlp = load_text_pipeline(settings.spacy_pipeline)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        shard = pickle.loads(row["shard"])
        pairs = read_shard(shard)
        parses = text_stage(pairs, self.nlp)
        return {"index": shard.index, "payload": pickle.dumps((pairs, parses))}


class DetectorStage:
    """Ray actor: pairs and parses -> the shard's records and images (a pickled ShardOutput)."""

    def __init__(self, settings: BuildSettings, detector_factory: Callable[[], Detector] | None) -> None:
        self.settings = settings
        self.detector = build_detector(settings, detector_factory)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        pairs, parses = pickle.loads(row["payload"])
        output = detector_stage(int(row["index"]), pairs, parses, self.detector, self.settings)
        return {"index": output.index, "payload": pickle.dumps(output)}


def write_stage(row: dict[str, Any], settings: BuildSettings) -> dict[str, Any]:
    """Ray task: write a shard's files; returns its manifest entry (JSON) for the driver to commit."""
    entry = write_shard(settings.output, pickle.loads(row["payload"]), settings.webdataset)
    return {"index": int(row["index"]), "entry": json.dumps(entry)}


def build_ray(
    settings: BuildSettings,
    progress: bool = True,
    detector_factory: Callable[[], Detector] | None = None,
    address: str | None = None,
) -> BuildSummary:
    """`grit.build` on Ray Data: `settings.workers` actors per CPU stage; one detector actor per GPU if any.

    address: a running cluster ("auto", "ray://host:10001"); None joins the cluster of an already initialised
    Ray, else starts a local instance (stopped again at the end). With GPUs in the cluster a model detector
    runs on "cuda" in actors holding one GPU each.
    """
    ray = _import_ray()
    began = time.perf_counter()
    shards, manifest = prepare(settings, detector_factory)
    pending = iter_pending(shards, manifest)
    started_here = not ray.is_initialized()
    counts = manifest.totals()
    total = sum(map(len, shards))
    bar = BuildProgress(progress, total, total - sum(map(len, pending)), counts)
    try:
        if started_here:
            ray.init(address=address, include_dashboard=False, log_to_driver=progress)
        if pending:
            ray.data.DataContext.get_current().enable_progress_bars = progress
            gpus = int(ray.cluster_resources().get("GPU", 0))
            model = detector_factory is None and settings.detector != "precomputed"
            detector_settings, detector_resources = settings, {"num_cpus": 1, "concurrency": settings.workers}
            if model and gpus:
                detector_settings = dataclasses.replace(settings, device="cuda")
                detector_resources = {"num_cpus": 1, "num_gpus": 1, "concurrency": gpus}
            rows = [{"shard": pickle.dumps(s)} for s in pending]
            dataset = (
                ray.data.from_items(rows, override_num_blocks=len(rows))
                .map(
                    TextStage,
                    fn_constructor_kwargs={"settings": settings},
                    concurrency=settings.workers,
                    num_cpus=1,
                )
                .map(
                    DetectorStage,
                    fn_constructor_kwargs={
                        "settings": detector_settings,
                        "detector_factory": detector_factory,
                    },
                    **detector_resources,
                )
                # Writing is I/O: it takes no CPU slot, so it never waits behind the actors holding them all.
                .map(write_stage, fn_kwargs={"settings": settings}, num_cpus=0)
            )
            for row in dataset.iter_rows():
                entry = json.loads(row["entry"])
                manifest.commit(int(row["index"]), entry)
                bar.update(entry)
    finally:
        bar.close()
        manifest.close()
        if started_here and ray.is_initialized():
            ray.shutdown()
    return BuildSummary.of(manifest, shards, pending, began)
