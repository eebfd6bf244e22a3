"""HowTo100M preparation on Apache Beam (the optional `beam` extra: pip install -e ".[beam]").

The pipeline is one parallel map over shard tasks: `Create(tasks) | Reshuffle | Map(run_shard)`.
Each task reads its videos and writes its own shard file in place, so no bulk data crosses the
pipeline (TFDS's Beam writers would move every serialized example through a shuffle, held in the
runner's memory on the DirectRunner and costing a full-dataset shuffle on Dataflow). Counters
`howto100m/videos_written`, `howto100m/videos_skipped` and `howto100m/records` show progress in
the runner's UI; the per-shard summaries are merged by the driver after the pipeline.

Options are Beam's own, e.g. one machine, all local cores:
  direct_num_workers=0,direct_running_mode=multi_processing
or Dataflow:
  runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,requirements_file=...
"""

from __future__ import annotations

from typing import Any


def pipeline_options(spec: str | Any) -> Any:
    """Beam PipelineOptions from 'key=value,key=value' (as TFDS's --beam_pipeline_options) or as given."""
    _require_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    if not isinstance(spec, str):
        return spec
    flags = [f"--{kv.strip()}" for kv in spec.split(",") if kv.strip()]
    return PipelineOptions(flags)


def _require_beam() -> None:
    import importlib.util
    import logging

    if importlib.util.find_spec("apache_beam") is None:
        raise ModuleNotFoundError('preparing on Apache Beam (--workers / --beam_pipeline_options) needs the beam '
                                  'extra: pip install -e ".[beam]"')
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # its INFO lines drown the progress


def local_options(workers: int) -> Any:
    """DirectRunner over `workers` local processes (0: one per core)."""
    return pipeline_options(f"direct_num_workers={int(workers)},direct_running_mode=multi_processing")


def _run_counted(task):
    from apache_beam.metrics import Metrics

    from tfds_builders.howto100m import shards

    s = shards.run_shard(task)
    Metrics.counter("howto100m", "videos_written").inc(len(s["written"]))
    Metrics.counter("howto100m", "videos_skipped").inc(len(s["skipped"]))
    Metrics.counter("howto100m", "records").inc(s["num_examples"])
    return task.index


def run(tasks: list, options: Any) -> None:
    """Runs `tasks` (shards.ShardTask) on Beam with `options` (PipelineOptions or 'k=v,...')."""
    _require_beam()
    import apache_beam as beam

    with beam.Pipeline(options=pipeline_options(options)) as p:
        _ = (p | "ShardTasks" >> beam.Create(tasks) | "Distribute" >> beam.Reshuffle()
             | "PrepareShard" >> beam.Map(_run_counted))
