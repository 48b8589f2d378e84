"""Configuration: defaults < YAML < flags, clear errors, every job's --help, a valid cluster file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.config import PipelineConfig, load_config, with_overrides

REPO = Path(__file__).resolve().parent.parent


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path: Path):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "ingest": {"shards": "/data/shards", "out": "/data/out", "decode_batch_size": 8},
                "ray": {"num_cpus": 3, "progress_bars": False},
            }
        )
    )
    parser = build_parser("test", main="ingest")
    cfg = parse_config(parser, ["--config", str(config), "--decode-batch-size", "16", "--ray-progress-bars"])
    assert cfg.ingest.shards == "/data/shards"
    assert cfg.ingest.decode_batch_size == 16  # flag beats YAML
    assert cfg.ray.num_cpus == 3  # YAML beats default
    assert cfg.ray.progress_bars is True
    assert cfg.ingest.max_image_pixels == PipelineConfig().ingest.max_image_pixels


def test_unknown_and_mistyped_options_are_clear_errors(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown option.*decode_bach_size.*known: shards"):
        with_overrides(PipelineConfig(), {"ingest": {"decode_bach_size": 3}})
    with pytest.raises(ValueError, match="unknown config section 'ingst'"):
        with_overrides(PipelineConfig(), {"ingst": {}})
    with pytest.raises(ValueError, match=r"ingest\.decode_batch_size: cannot read 'many' as int"):
        with_overrides(PipelineConfig(), {"ingest": {"decode_batch_size": "many"}})
    with pytest.raises(ValueError, match="expected true/false"):
        with_overrides(PipelineConfig(), {"ray": {"progress_bars": "yes please"}})
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(bad)


def test_configs_are_frozen():
    cfg = PipelineConfig()
    with pytest.raises(AttributeError):
        cfg.ingest.out = "x"  # type: ignore[misc]


def test_required_option_missing_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(build_parser("test", main="ingest"), ["--out", "x"])
    assert exit_info.value.code == 2
    assert "--shards is required" in capsys.readouterr().err


@pytest.mark.slow
def test_every_job_answers_help():
    jobs = sorted(p for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_"))
    assert jobs
    for job in jobs:
        done = subprocess.run(
            [sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{job.name}: {done.stderr[-2000:]}"
        assert "--config" in done.stdout, job.name


def test_cluster_file_is_valid_for_the_ray_cluster_launcher():
    from ray.autoscaler._private.util import validate_config

    cluster = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(cluster)  # Ray's own JSON schema for `ray up`
    assert cluster["head_node_type"] in cluster["available_node_types"]
    gpu_types = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types, "the cluster needs GPU workers for embedding and audits"
    assert any("pip install" in cmd and "-e ." in cmd for cmd in cluster["setup_commands"])
    # Stages hand files to each other across nodes: every host mounts one shared file system, and
    # the container sees it at the same path.
    assert any("mount -t nfs4" in cmd and "/mnt/shared" in cmd for cmd in cluster["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in cluster["docker"]["run_options"]


def test_cluster_file_turns_token_auth_on_and_keeps_the_dashboard_off_the_network():
    cluster = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [cmd for cmd in starts if "ray start" in cmd]
    assert ray_starts and all("RAY_AUTH_MODE=token ray start" in cmd for cmd in ray_starts)
    head = " ".join(cmd for cmd in cluster["head_start_ray_commands"] if "--head" in cmd)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
