"""Embed img2dataset shards with an open_clip model into img_emb/, text_emb/ and metadata/ (LAION layout).

python jobs/embed.py --shards DIR --out DIR                       # offline tiny model (non-semantic)
python jobs/embed.py --shards DIR --out DIR --model ViT-B-32 --pretrained laion2b_s34b_b79k
python jobs/embed.py --shards DIR --out DIR --model ViT-B-32 --checkpoint PATH
ray job submit --working-dir . -- python jobs/embed.py --shards DIR --out DIR --model ...
"""

from _bootstrap import run_job

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session
from pipeline.embed.embed import run_embed


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="embed"), argv)
    # Ray starts only if a shard is to be embedded: a re-run over embedded shards does without it.
    with output_lock(cfg.embed.out, job="embed"), ray_session(cfg.ray, lazy=True) as ray:
        summary = run_embed(cfg.embed)
    summary.pop("per_partition")  # kept in embed_summary.json; the stdout line stays one short line
    summary.update(up_to_date=summary["partitions_processed"] == 0, ray_started=ray.started)
    return summary


if __name__ == "__main__":
    run_job(main)
